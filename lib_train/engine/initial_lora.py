"""Start from an existing LoRA file: its tensors replace the freshly initialised weights of the run's network."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..common.errors import ConfigError
from .network import LoRANetwork


def load_initial_lora(network: LoRANetwork, path: str | Path) -> None:
    """Copy the file's tensors into ``network``; a file of another layout (network type, rank, layers, family) or
    alpha is refused naming the first difference, and the network is left as it was."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The LoRA file to start from was not found: {path}")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors reports bad headers with its own error type, unreadable files as OSError
        raise ConfigError(f"The LoRA file to start from cannot be read ({error}): {path}") from None
    own = network.kohya_state_dict(torch.float32)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        example = f"missing {missing[0]}" if missing else f"not in this network: {unexpected[0]}"
        raise ConfigError(f"{path.name} does not have this run's shape: {len(missing)} tensor(s) missing, "
                          f"{len(unexpected)} unexpected ({example}). Choose the same network type, layers and "
                          "text-encoder training as the file (and the model family it was trained on).")
    wrong = [key for key in own if tuple(state[key].shape) != tuple(own[key].shape)]
    if wrong:
        raise ConfigError(f"{path.name} does not have this run's shape: {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                          f"this run's is {tuple(own[wrong[0]].shape)} (another rank or LoKr factor?). Set the "
                          "rank and network options the file was trained with.")
    alphas = [key for key in own if key.endswith(".alpha") and not torch.equal(state[key].float(), own[key])]
    if alphas:
        raise ConfigError(f"{path.name} has alpha {float(state[alphas[0]]):g} ({alphas[0]}), the settings "
                          f"{float(own[alphas[0]]):g}: set Alpha (and Conv alpha) to the file's.")
    network.load_kohya_state_dict({key: tensor.float() for key, tensor in state.items()})
