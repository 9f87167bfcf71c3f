"""Start from an existing LoRA file: its tensors replace the freshly initialised weights of the run's network."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..common.errors import ConfigError
from ..common.i18n import tr
from .network import LoRANetwork


def load_initial_lora(network: LoRANetwork, path: str | Path) -> None:
    """Copy the file's tensors into ``network``; a file of another layout (network type, rank, layers, family) or
    alpha is refused naming the first difference, and the network is left as it was."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(tr("The LoRA file to start from was not found: {path}", path=path))
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors reports bad headers with its own error type, unreadable files as OSError
        raise ConfigError(tr("The LoRA file to start from cannot be read ({error}): {path}", error=error,
                             path=path)) from None
    own = network.kohya_state_dict(torch.float32)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        example = (tr("missing {key}", key=missing[0]) if missing else
                   tr("not in this network: {key}", key=unexpected[0]))
        raise ConfigError(tr("{name} does not have this run's shape: {count_missing} tensor(s) missing, "
                             "{count_unexpected} unexpected ({example}). Choose the same network type, layers and "
                             "text-encoder training as the file (and the model family it was trained on).",
                             name=path.name, count_missing=len(missing), count_unexpected=len(unexpected),
                             example=example))
    wrong = [key for key in own if tuple(state[key].shape) != tuple(own[key].shape)]
    if wrong:
        raise ConfigError(tr("{name} does not have this run's shape: {key} is {shape}, this run's is {own_shape} "
                             "(another rank or LoKr factor?). Set the rank and network options the file was trained "
                             "with.", name=path.name, key=wrong[0], shape=tuple(state[wrong[0]].shape),
                             own_shape=tuple(own[wrong[0]].shape)))
    alphas = [key for key in own if key.endswith(".alpha") and not torch.equal(state[key].float(), own[key])]
    if alphas:
        raise ConfigError(tr("{name} has alpha {alpha:g} ({key}), the settings {own_alpha:g}: set Alpha (and Conv "
                             "alpha) to the file's.", name=path.name, alpha=float(state[alphas[0]]), key=alphas[0],
                             own_alpha=float(own[alphas[0]])))
    network.load_kohya_state_dict({key: tensor.float() for key, tensor in state.items()})
