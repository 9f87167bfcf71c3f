"""Reading a checkpoint in the original (LDM/sgm) key layout into a model built on the meta device."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..common.errors import CheckpointError
from ..common.i18n import tr


def checkpoint_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a ``.safetensors`` checkpoint, from its header only: what its family is told
    from before the tensors (10-23 GB for SD3 or Flux) are read. No pickle is ever read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(tr("Checkpoint not found: {path}", path=path))
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(tr("{name}: only .safetensors checkpoints can be loaded (pickled .ckpt/.pt files can "
                                 "run code when opened). Convert it to safetensors first.", name=path.name))
    try:
        with safe_open(str(path), "pt") as handle:
            header = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(tr("{name} is not a readable safetensors file: {error}", name=path.name, error=error)) from None
    if not any(key.startswith("model.diffusion_model.") for key in header):
        raise CheckpointError(tr("{name} has no UNet weights in the LDM layout (model.diffusion_model.*); diffusers "
                                 "folders and LoRA files are not checkpoints.", name=path.name))
    return header


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` checkpoint (checked as ``checkpoint_header`` checks it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    checkpoint_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(tr("{name} is not a readable safetensors file: {error}", name=Path(path).name,
                                 error=error)) from None


def checkpoint_family(header: dict[str, tuple[int, ...]]) -> str:
    """"sd1", "sd2", "sdxl", or a description of a model Train Tools cannot train, as the WebUI tells them apart,
    from the tensors' names and shapes (``checkpoint_header``)."""
    unet_input = header.get("model.diffusion_model.input_blocks.0.0.weight")
    latent_input = unet_input is None or unet_input[1] == 4  # inpainting and instruct-pix2pix take 9 and 8
    if any(key.startswith("conditioner.") for key in header):
        if "conditioner.embedders.0.model.ln_final.weight" in header:  # the refiner has only OpenCLIP bigG
            return tr("an SDXL refiner")
        return "sdxl" if latent_input else tr("an SDXL inpainting model")
    if any(key.startswith("model.diffusion_model.joint_blocks.") for key in header):
        return tr("an SD3")
    if any(key.startswith("model.diffusion_model.double_blocks.") for key in header):
        return tr("a Flux")
    if any(key.startswith("cond_stage_model.model.") for key in header):
        return "sd2"
    return "sd1" if latent_input else tr("an SD1.x inpainting or instruct-pix2pix")


def adopt_weights(model: nn.Module, state: dict[str, torch.Tensor], file_name: str, family_label: str,
                  not_in_file: set[str] = frozenset()) -> None:
    """Give a meta-device model the file's tensors (no random init, no second copy in RAM). Every weight must
    be in the file with the right shape, except the names in ``not_in_file`` (non-persistent or rebuilt)."""
    ours = model.state_dict()
    wanted = {k: v for k, v in state.items() if k in ours}
    missing = sorted(set(ours) - set(wanted) - set(not_in_file))
    if missing:
        raise CheckpointError(tr("{file_name} does not look like an {family_label} checkpoint: {count_missing} "
                                 "weights are missing, e.g. {value}.", file_name=file_name, family_label=family_label,
                                 count_missing=len(missing), value=missing[0]))
    mismatched = [k for k, v in wanted.items() if v.shape != ours[k].shape]
    if mismatched:
        raise CheckpointError(tr("{file_name}: {value} has shape {value2}, {family_label} needs {value3}.",
                                 file_name=file_name, value=mismatched[0], value2=tuple(wanted[mismatched[0]].shape),
                                 family_label=family_label, value3=tuple(ours[mismatched[0]].shape)))
    model.load_state_dict(wanted, strict=False, assign=True)


def rebuild_position_ids(text_encoder: nn.Module) -> None:
    """CLIP's position_ids is a non-persistent buffer, so it is still on the meta device after loading."""
    for module in text_encoder.modules():
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape)


def check_nothing_left_on_meta(model: nn.Module, file_name: str) -> None:
    still_empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_empty:
        raise CheckpointError(tr("{file_name}: no value for {value}.", file_name=file_name, value=still_empty[0]))
