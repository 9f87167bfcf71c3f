"""Train Tools' half of the ComfyUI check (run with the project's Python; check_comfyui.py starts it): each LoRA
module's ΔW at multiplier 1 as Train Tools computes it, written as a stream of records (delta_stream.py).

    checkpoint --checkpoint sd.safetensors --out DIR FILE...   ΔW of each file, read back through
         LoRANetwork.for_kohya_state_dict on the checkpoint loaded by the project's SD1 or SD2 loader (as the
         command line picks it from the file's keys) (DIR/<stem>.deltas)
    sdxl --out DIR TYPE...   full-size SDXL files synthesised without weights: the project's SDXL built on the
         meta device, each targeted layer given a stand-in weight in turn, its module made by the training code
         (new_module) with every factor perturbed, saved fp16 as training saves (DIR/sdxl-<type>.safetensors, and
         the checkpoint's tensor shapes in DIR/sdxl-shapes.json for ComfyUI's model detection)
    sdxl-deltas FILE [--every N]   ΔW of such a file to stdout (10 GB for LoRA: never written to disk), each
         module (every Nth: on 2 cores a full SDXL pass takes long) rebuilt from the file's tensors as
         for_kohya_state_dict does, on its layer's stand-in weight
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from delta_stream import stand_in_base_weight, write_record  # noqa: E402
from lib_train.engine.lora_names import LoraTarget, model_targets  # noqa: E402
from lib_train.engine.network import LoRANetwork, _module_from_tensors, new_module  # noqa: E402
from lib_train.engine.network_spec import NetworkSpec  # noqa: E402
from lib_train.hosts.protocol import ModelFamily  # noqa: E402

# The network types checked, as TrainConfig settings (rank 4; 3x3 convolutions at conv rank 4 except plain LoRA).
NETWORK_TYPES = {
    "lora": dict(network_type="lora", conv_rank=0),
    "locon": dict(network_type="locon", conv_rank=4),
    "loha": dict(network_type="loha", conv_rank=4),
    "lokr": dict(network_type="lokr", conv_rank=4),
    "dora": dict(network_type="lora", conv_rank=4, dora=True),
}


def checkpoint_deltas(checkpoint: Path, files: list[Path], out: Path) -> None:
    from safetensors import safe_open

    from lib_train.hosts.sd1 import load_sd1_checkpoint
    from lib_train.hosts.sd2 import load_sd2_checkpoint
    from lib_train.hosts.standalone import StandaloneHost
    from lib_train.hosts.standalone_sd2 import StandaloneSD2Host

    with safe_open(str(checkpoint), "pt") as handle:
        sd2 = any(key.startswith("cond_stage_model.model.") for key in handle.keys())  # OpenCLIP: SD2
    if sd2:
        host = StandaloneSD2Host(load_sd2_checkpoint(checkpoint))
    else:
        host = StandaloneHost(load_sd1_checkpoint(checkpoint))
    for path in files:
        network = LoRANetwork.for_kohya_state_dict(host, load_file(str(path)))
        with torch.no_grad(), open(out / f"{path.stem}.deltas", "wb") as stream:
            for module in network.modules_in_order():
                write_record(stream, module.key, module.weight_delta())
        print(f"{path.name}: {len(list(network.modules_in_order()))} modules", flush=True)
        del network


def sdxl_files(types: list[str], out: Path) -> None:
    from lib_train.hosts.sdxl import build_sdxl

    with torch.device("meta"):
        model = build_sdxl()
    shapes = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    (out / "sdxl-shapes.json").write_text(json.dumps(shapes))
    encoders = [(model.text_encoder_1, "lora_te1"), (model.text_encoder_2, "lora_te2")]
    generator = torch.Generator().manual_seed(0)
    for name in types:
        spec = NetworkSpec(rank=4, alpha=4.0, conv_alpha=2.0, **NETWORK_TYPES[name])
        unet_part, text_part = model_targets(ModelFamily.SDXL, model.unet, encoders, spec.with_convs, spec.lycoris)
        state: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for target in unet_part + text_part:
                with stand_in_weight(target):
                    module = new_module(spec, target, generator, torch.device("cpu"))
                    for parameter in module.parameters():  # zero-initialised factors would give ΔW = 0
                        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
                    state.update({f"{module.key}.{suffix}": tensor.to(torch.float16).contiguous()
                                  for suffix, tensor in module.state_tensors().items()})
        path = out / f"sdxl-{name}.safetensors"
        save_file(state, str(path))
        print(f"{path.name}: {len({key.partition('.')[0] for key in state})} modules", flush=True)


def sdxl_deltas(path: Path, every: int = 1) -> None:
    """Each module rebuilt from the file's tensors (for_kohya_state_dict's per-module step), one layer at a time."""
    stream = os.fdopen(os.dup(1), "wb", buffering=1 << 20)
    os.dup2(2, 1)  # whatever else prints goes to stderr: stdout carries the records
    from lib_train.hosts.sdxl import build_sdxl

    with torch.device("meta"):
        model = build_sdxl()
    encoders = [(model.text_encoder_1, "lora_te1"), (model.text_encoder_2, "lora_te2")]
    unet_part, text_part = model_targets(ModelFamily.SDXL, model.unet, encoders, with_convs=True, lycoris=True)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        stem, _, suffix = key.partition(".")
        tensors.setdefault(stem, {})[suffix] = tensor
    unknown = set(tensors) - {target.key for target in unet_part + text_part}
    if unknown:
        raise SystemExit(f"{len(unknown)} keys match no SDXL layer, e.g. {sorted(unknown)[0]}")
    with torch.no_grad(), stream:
        in_file = [target for target in unet_part + text_part if target.key in tensors]
        for target in in_file[::every]:
            with stand_in_weight(target):
                module = _module_from_tensors(target, tensors[target.key], torch.device("cpu"))
                for suffix, tensor in module.state_tensors().items():
                    tensor.copy_(tensors[target.key][suffix])
                write_record(stream, module.key, module.weight_delta())


class stand_in_weight:
    """The target layer's weight made real (the stand-in of its LoRA key) for the block, back on meta after."""

    def __init__(self, target: LoraTarget):
        self.target = target

    def __enter__(self) -> None:
        layer, part, key = self.target.module, self.target.fused_part, self.target.key
        if part is None:
            self._set(layer, "weight", stand_in_base_weight(key, tuple(layer.weight.shape)))
        elif part == "out":
            self._set(layer.out_proj, "weight", stand_in_base_weight(key, tuple(layer.out_proj.weight.shape)))
        else:  # only this part's rows of the fused q/k/v weight are read
            size = layer.embed_dim
            fused = torch.zeros(3 * size, size)
            fused["qkv".index(part) * size:("qkv".index(part) + 1) * size] = stand_in_base_weight(key, (size, size))
            self._set(layer, "in_proj_weight", fused)

    def __exit__(self, *exc) -> None:
        layer, part = self.target.module, self.target.fused_part
        owner, name = (layer.out_proj, "weight") if part == "out" else (layer, "in_proj_weight" if part else "weight")
        self._set(owner, name, torch.empty(getattr(owner, name).shape, device="meta"))

    @staticmethod
    def _set(owner: nn.Module, name: str, value: torch.Tensor) -> None:
        setattr(owner, name, nn.Parameter(value, requires_grad=False))


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    loaded = commands.add_parser("checkpoint")
    loaded.add_argument("--checkpoint", type=Path, required=True)
    loaded.add_argument("--out", type=Path, required=True)
    loaded.add_argument("files", type=Path, nargs="+")
    sdxl = commands.add_parser("sdxl")
    sdxl.add_argument("--out", type=Path, required=True)
    sdxl.add_argument("types", nargs="+", choices=sorted(NETWORK_TYPES))
    sdxl_delta = commands.add_parser("sdxl-deltas")
    sdxl_delta.add_argument("file", type=Path)
    sdxl_delta.add_argument("--every", type=int, default=1)
    args = parser.parse_args()
    if args.command == "sdxl-deltas":
        sdxl_deltas(args.file, args.every)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "checkpoint":
        checkpoint_deltas(args.checkpoint, args.files, args.out)
    else:
        sdxl_files(args.types, args.out)


if __name__ == "__main__":
    main()
