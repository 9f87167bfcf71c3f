"""The set of LoRA modules for one model: which layers, attach/detach, and the kohya state dict."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..hosts.protocol import TrainingHost
from .lora_names import LoraTarget, model_targets
from .network_fused_attention import FusedAttentionLoRA
from .network_lora import LoRAModule


class LoRANetwork(nn.Module):
    """LoRA modules keyed by their kohya name, split into UNet and text-encoder parts."""

    def __init__(self, unet_modules: list[LoRAModule], text_encoder_modules: list[LoRAModule]):
        super().__init__()
        self.unet_modules = nn.ModuleList(unet_modules)
        self.text_encoder_modules = nn.ModuleList(text_encoder_modules)
        keys = [m.key for m in self.modules_in_order()]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise ValueError(f"Duplicate LoRA keys: {sorted(duplicates)[:5]}")
        # Parts of one fused attention (OpenCLIP) act together through that attention's forward.
        groups: dict[int, tuple[nn.Module, dict[str, LoRAModule]]] = {}
        for module in self.modules_in_order():
            if module.fused_part is not None:
                base = module._base[0]
                groups.setdefault(id(base), (base, {}))[1][module.fused_part] = module
        self._fused = [FusedAttentionLoRA(attention, parts) for attention, parts in groups.values()]

    @classmethod
    def for_host(
        cls,
        host: TrainingHost,
        *,
        rank: int,
        alpha: float,
        conv_rank: int = 0,
        conv_alpha: float = 1.0,
        train_text_encoder: bool = True,
        seed: int = 0,
    ) -> "LoRANetwork":
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def build(targets: list[LoraTarget]) -> list[LoRAModule]:
            modules = []
            for target in targets:
                r, a = (conv_rank, conv_alpha) if target.is_conv_3x3 else (rank, alpha)
                modules.append(LoRAModule(target.key, target.module, r, a, generator, device=host.device,
                                          fused_part=target.fused_part))
            return modules

        unet_part, text_part = _host_targets(host, with_convs=conv_rank > 0)
        unet_modules = build(unet_part)
        te_modules = build(text_part) if train_text_encoder else []
        return cls(unet_modules, te_modules)

    @classmethod
    def for_kohya_state_dict(cls, host: TrainingHost, state: dict[str, torch.Tensor]) -> "LoRANetwork":
        """Modules shaped like a kohya file's (which layers, each module's rank), ready for
        ``load_kohya_state_dict``: the epochs of one run share this shape, so one network serves them all."""
        unet_part, text_part = _host_targets(host, with_convs=True)
        targets = unet_part + text_part
        file_keys = {key.split(".", 1)[0] for key in state}
        unknown = file_keys - {target.key for target in targets}
        if unknown:
            raise ValueError(f"{len(unknown)} LoRA keys match no layer of the loaded model (e.g. {sorted(unknown)[0]}); "
                             "was this file trained on another model family?")

        def build(part: list[LoraTarget]) -> list[LoRAModule]:
            modules = []
            for target in part:
                if target.key in file_keys:
                    rank = state[f"{target.key}.lora_down.weight"].shape[0]
                    alpha = float(state[f"{target.key}.alpha"])
                    modules.append(LoRAModule(target.key, target.module, rank, alpha, device=host.device,
                                              fused_part=target.fused_part))
            return modules

        network = cls(build(unet_part), build(text_part))
        network.load_kohya_state_dict(state)
        return network

    def modules_in_order(self) -> Iterator[LoRAModule]:
        yield from self.unet_modules
        yield from self.text_encoder_modules

    def attach(self) -> None:
        for module in self.modules_in_order():
            module.attach()
        for fused in self._fused:
            fused.attach()

    def detach(self) -> None:
        for module in self.modules_in_order():
            module.detach()
        for fused in self._fused:
            fused.detach()

    @contextmanager
    def attached(self) -> Iterator["LoRANetwork"]:
        """Hooks in place for the duration of the block, removed whatever happens."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.modules_in_order():
            module.multiplier = multiplier

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``<key>.lora_down.weight``, ``<key>.lora_up.weight`` and ``<key>.alpha``, on CPU, contiguous."""
        state = {}
        for module in self.modules_in_order():
            state[f"{module.key}.lora_down.weight"] = module.lora_down.weight.detach().to("cpu", dtype).contiguous()
            state[f"{module.key}.lora_up.weight"] = module.lora_up.weight.detach().to("cpu", dtype).contiguous()
            state[f"{module.key}.alpha"] = module.alpha.detach().to("cpu", dtype).contiguous()
        return state

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors of a kohya file into the modules; every key must match in name and shape."""
        expected = set(self.kohya_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"LoRA keys do not match: {len(missing)} missing, {len(unexpected)} unexpected "
                             f"(e.g. {sorted(missing or unexpected)[0]})")
        with torch.no_grad():
            for module in self.modules_in_order():
                module.lora_down.weight.copy_(state[f"{module.key}.lora_down.weight"])
                module.lora_up.weight.copy_(state[f"{module.key}.lora_up.weight"])
                module.alpha.copy_(state[f"{module.key}.alpha"])

    def parameter_groups(self, unet_lr: float, text_encoder_lr: float, unet_up_ratio: float = 0.0,
                         text_encoder_up_ratio: float = 0.0) -> list[dict]:
        """The optimizer's groups: the UNet's modules, then the text encoders'. With a LoRA+ ratio (0: off) a
        part's up weights get their own group ("unet plus", "text_encoder plus") at its learning rate × ratio."""
        groups = _lr_groups("unet", self.unet_modules, unet_lr, unet_up_ratio)
        if len(self.text_encoder_modules):
            groups += _lr_groups("text_encoder", self.text_encoder_modules, text_encoder_lr, text_encoder_up_ratio)
        return groups


def is_up_weight(parameter_name: str) -> bool:
    """LoRA+ (Hayou et al. 2024) trains B of ΔW = B·A, the zero-initialised output side, faster. It is chosen by
    the parameter's name in the file's layout, as kohya's networks.lora and LyCORIS choose it: everything under a
    ``lora_up`` (LoRA, LoCon, DoRA's up). LoHa's ``hada_*`` and LoKr's ``lokr_*`` factors have none, so LyCORIS, and
    this, train them at the base rate."""
    return "lora_up" in parameter_name


def _lr_groups(name: str, modules: nn.ModuleList, lr: float, up_ratio: float) -> list[dict]:
    if not up_ratio:
        return [{"params": list(modules.parameters()), "lr": lr, "name": name}]
    named = list(modules.named_parameters())
    groups = [{"params": [p for n, p in named if not is_up_weight(n)], "lr": lr, "name": name}]
    up = [p for n, p in named if is_up_weight(n)]
    if up:
        groups.append({"params": up, "lr": lr * up_ratio, "name": f"{name} plus"})
    return groups



def _host_targets(host: TrainingHost, with_convs: bool) -> tuple[list[LoraTarget], list[LoraTarget]]:
    encoders = [(encoder.module, encoder.key_prefix) for encoder in host.text_encoders]
    return model_targets(host.family, host.unet, encoders, with_convs)
