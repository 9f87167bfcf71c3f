"""SD2's text encoder on the real open_clip and ldm the WebUI holds, where CI cannot go (open_clip needs
torchvision). Run with the WebUI's own Python, its Stability ldm on the path:

    /work/webui/venv/bin/python tests/webui/check_openclip_sd2.py --webui /work/webui

Builds ldm's ``FrozenOpenCLIPEmbedder`` (layer "penultimate", ``pretrained=None``) on a tiny open_clip config and
the WebUI's ldm ``UNetModel`` at tiny widths, then checks that Train Tools' OpenCLIP twin (which CI trains on) has
the same tensor names and gives the same conditioning, that its LoRA targets and fused-attention forward work on
open_clip's own modules (hooked output equal to the twin's and to the built-in Lora's merge), and that the
network detaches leaving every weight as it was. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]
from webui_api import check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--webui", type=Path, default=Path("/work/webui"))
    args = parser.parse_args()
    sys.path.insert(0, str(args.webui / "repositories" / "stable-diffusion-stability-ai"))

    import open_clip
    import torch
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder

    from lib_train.engine.model_guard import fingerprint, hook_count
    from lib_train.engine.network import LoRANetwork
    from lib_train.hosts.openclip_text import OpenCLIPText, encode_through_blocks
    from lib_train.hosts.protocol import ModelFamily, TextEncoder
    from lib_train.hosts.sd2 import TINY_SD2_TEXT, TINY_SD2_UNET
    from tests import a1111_lora

    text = {k: TINY_SD2_TEXT[k] for k in ("context_length", "vocab_size", "width", "heads", "layers")}
    open_clip.factory._MODEL_CONFIGS["train-tools-tiny"] = {
        "embed_dim": TINY_SD2_TEXT["embed_dim"], "text_cfg": text,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 8}}
    torch.manual_seed(0)
    embedder = FrozenOpenCLIPEmbedder(arch="train-tools-tiny", version=None, device="cpu", layer="penultimate")
    real = embedder.model
    with torch.no_grad():  # open_clip's init leaves some biases at 0: make every weight count
        for parameter in real.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    twin = OpenCLIPText(**TINY_SD2_TEXT)
    missing, unexpected = twin.load_state_dict(real.state_dict(), strict=False)
    check(not missing and not unexpected, f"the twin has open_clip {open_clip.version.__version__}'s tensor names "
          f"(missing {missing[:2]}, unexpected {unexpected[:2]})")

    tokens = open_clip.tokenize(["a red circle", "hat (object), ttconcept"])
    with torch.no_grad():
        theirs = embedder.encode_with_transformer(tokens)
        ours = encode_through_blocks(twin, tokens, len(twin.transformer.resblocks) - embedder.layer_idx)
    check(torch.allclose(theirs, ours, atol=1e-6), f"the twin's conditioning equals ldm's encode_with_transformer "
          f"(max difference {(theirs - ours).abs().max():.2e})")

    unet = UNetModel(**TINY_SD2_UNET)  # the WebUI's own ldm

    def network_on(model):
        host = SimpleNamespace(family=ModelFamily.SD2, unet=unet, device=torch.device("cpu"),
                               text_encoders=[TextEncoder(model, "lora_te")])
        return LoRANetwork.for_host(host, rank=4, alpha=2.0, seed=3)

    network, twin_network = network_on(real), network_on(twin)
    check(len(network.text_encoder_modules) == 6 * (TINY_SD2_TEXT["layers"] - 1),
          f"{len(network.text_encoder_modules)} text modules on open_clip's tree: all blocks but the unused last")
    with torch.no_grad():
        for module in network.modules_in_order():
            module.lora_up.weight.normal_(0, 0.05)
    state = network.kohya_state_dict()
    twin_network.load_kohya_state_dict(state)
    before = fingerprint(real)
    with torch.no_grad():
        with network.attached():
            hooked = embedder.encode_with_transformer(tokens)
        with twin_network.attached():
            hooked_twin = encode_through_blocks(twin, tokens, len(twin.transformer.resblocks) - 1)
    check(hook_count(real) == 0 and fingerprint(real) == before, "open_clip's modules exactly as before after detaching")
    check(not torch.allclose(hooked, theirs, atol=1e-4), "the LoRA changes open_clip's conditioning")
    check(torch.allclose(hooked, hooked_twin, atol=1e-5), "hooked open_clip equals the hooked twin")

    layers = a1111_lora.split_by_layer(state)
    with torch.no_grad():
        for index, block in enumerate(real.transformer.resblocks[:-1]):
            stem = f"lora_te_text_model_encoder_layers_{index}"
            parts = {p: layers[f"{stem}_self_attn_{p}_proj"] for p in "qkv"} | {"out": layers[f"{stem}_self_attn_out_proj"]}
            a1111_lora.merge_attention(block.attn, parts, 1.0)
            a1111_lora.merge_layer(block.mlp.c_fc, layers[f"{stem}_mlp_fc1"], 1.0)
            a1111_lora.merge_layer(block.mlp.c_proj, layers[f"{stem}_mlp_fc2"], 1.0)
        merged = embedder.encode_with_transformer(tokens)
    check(torch.allclose(hooked, merged, atol=1e-5), f"hooked equals the built-in Lora's merge on open_clip "
          f"(max difference {(hooked - merged).abs().max():.2e})")
    print("all checks passed")


if __name__ == "__main__":
    main()
