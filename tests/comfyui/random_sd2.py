"""A random-weight SD2.x checkpoint at full size, in the original LDM key layout, for the ComfyUI check when no
real SD2 file is at hand (run with the project's Python; 2.6 GB on disk, ~6 GiB while building).

    .venv/bin/python tests/comfyui/random_sd2.py OUT.safetensors [--conv-projections] [--epsilon]

The tree is the project's SD2 (ldm's UNetModel and AutoencoderKL, the OpenCLIP ViT-H text tower), which CI checks
tensor for tensor against the checkpoint layout; ComfyUI's loader then reports any key it misses. The weights are
PyTorch's initialisation with the zero-initialised output layers made N(0, 0.02) (a zero up weight would make
every gradient into it zero), saved as float16 as Stability's releases are. Beside it, ``OUT.yaml`` says
``parameterization: "v"`` (the 768-v release) unless --epsilon (the 512 base), as the WebUI reads a config.
``--conv-projections`` gives the 1×1-convolution ``proj_in``/``proj_out`` of a config without
``use_linear_in_transformer``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lib_train.hosts.sd1 import randomise_zero_weights  # noqa: E402
from lib_train.hosts.sd2 import SD2_UNET, build_sd2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--conv-projections", action="store_true")
    parser.add_argument("--epsilon", action="store_true", help="the 512 base's epsilon prediction")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = build_sd2(dict(SD2_UNET, use_linear_in_transformer=not args.conv_projections))
    randomise_zero_weights(model, args.seed)
    state = {key: tensor.to(torch.float16).contiguous() for key, tensor in model.state_dict().items()}
    del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out))
    parameterization = "eps" if args.epsilon else "v"
    args.out.with_suffix(".yaml").write_text(f'model:\n  params:\n    parameterization: "{parameterization}"\n')
    print(f"{args.out}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} values, "
          f"parameterization {parameterization}")


if __name__ == "__main__":
    main()
