"""The set of network modules for one model: which layers, attach/detach, and the kohya state dict.

Every module type (network_lora, network_loha, network_lokr) sits on the same base (network_base), so the
network, the fused OpenCLIP attention and the preview grid's per-sample multipliers treat them alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..hosts.protocol import TrainingHost
from .lora_names import LoraTarget, model_targets
from .network_base import NetworkModule, layer_geometry
from .network_fused_attention import FusedAttentionLoRA
from .network_lokr import LokrLayout, LoKrModule
from .network_loha import LoHaModule
from .network_lora import LoRAModule
from .network_spec import NetworkSpec

MODULE_TYPES = (LoRAModule, LoHaModule, LoKrModule)  # tried in this order on a file's tensors


class LoRANetwork(nn.Module):
    """Network modules keyed by their kohya name, split into UNet and text-encoder parts."""

    def __init__(self, unet_modules: list[NetworkModule], text_encoder_modules: list[NetworkModule]):
        super().__init__()
        self.unet_modules = nn.ModuleList(unet_modules)
        self.text_encoder_modules = nn.ModuleList(text_encoder_modules)
        keys = [m.key for m in self.modules_in_order()]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise ValueError(f"Duplicate LoRA keys: {sorted(duplicates)[:5]}")
        # Parts of one fused attention (OpenCLIP) act together through that attention's forward.
        groups: dict[int, tuple[nn.Module, dict[str, NetworkModule]]] = {}
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
        network_type: str = "lora",
        dora: bool = False,
        lokr_factor: int = -1,
        decompose_both: bool = False,
        train_text_encoder: bool = True,
        seed: int = 0,
    ) -> "LoRANetwork":
        spec = NetworkSpec(network_type, rank, alpha, conv_rank, conv_alpha, dora, lokr_factor, decompose_both)
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def build(targets: list[LoraTarget]) -> list[NetworkModule]:
            return [new_module(spec, target, generator, host.device) for target in targets]

        unet_part, text_part = _host_targets(host, with_convs=spec.with_convs, lycoris=spec.lycoris)
        unet_modules = build(unet_part)
        te_modules = build(text_part) if train_text_encoder else []
        return cls(unet_modules, te_modules)

    @classmethod
    def for_kohya_state_dict(cls, host: TrainingHost, state: dict[str, torch.Tensor]) -> "LoRANetwork":
        """Modules shaped like a kohya or LyCORIS file's (which layers, each module's type and shapes), ready for
        ``load_kohya_state_dict``: the epochs of one run share this shape, so one network serves them all."""
        unet_part, text_part = _host_targets(host, with_convs=True, lycoris=True)  # every layer either writes
        targets = unet_part + text_part
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            stem, _, suffix = key.partition(".")
            tensors.setdefault(stem, {})[suffix] = tensor
        unknown = set(tensors) - {target.key for target in targets}
        if unknown:
            raise ValueError(f"{len(unknown)} LoRA keys match no layer of the loaded model (e.g. {sorted(unknown)[0]}); "
                             "was this file trained on another model family?")

        def build(part: list[LoraTarget]) -> list[NetworkModule]:
            return [_module_from_tensors(target, tensors[target.key], host.device) for target in part
                    if target.key in tensors]

        network = cls(build(unet_part), build(text_part))
        network.load_kohya_state_dict(state)
        return network

    def modules_in_order(self) -> Iterator[NetworkModule]:
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

    def detach_text_encoder(self) -> None:
        """Remove the text encoders' part only (its fused attentions too), leaving the UNet's attached."""
        text_parts = {id(module) for module in self.text_encoder_modules}
        for module in self.text_encoder_modules:
            module.detach()
        for fused in self._fused:
            if any(id(part) in text_parts for part in fused.parts.values()):
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
        """Each module's tensors under ``<key>.<suffix>`` (``lora_down.weight``, ``hada_w1_a``, ``alpha`` ...),
        on CPU, contiguous."""
        return {f"{module.key}.{suffix}": tensor.detach().to("cpu", dtype).contiguous()
                for module in self.modules_in_order() for suffix, tensor in module.state_tensors().items()}

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors of a file into the modules; every key must match in name and shape."""
        own = {f"{module.key}.{suffix}": tensor
               for module in self.modules_in_order() for suffix, tensor in module.state_tensors().items()}
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise ValueError(f"LoRA keys do not match: {len(missing)} missing, {len(unexpected)} unexpected "
                             f"(e.g. {sorted(missing or unexpected)[0]})")
        wrong = [key for key, tensor in own.items() if tuple(state[key].shape) != tuple(tensor.shape)]
        if wrong:
            raise ValueError(f"{len(wrong)} LoRA tensors have another shape than this network's (e.g. {wrong[0]}: "
                             f"{tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)})")
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key])

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


def _host_targets(host: TrainingHost, with_convs: bool, lycoris: bool) -> tuple[list[LoraTarget], list[LoraTarget]]:
    encoders = [(encoder.module, encoder.key_prefix) for encoder in host.text_encoders]
    return model_targets(host.family, host.unet, encoders, with_convs, lycoris)


def new_module(spec: NetworkSpec, target: LoraTarget, generator: torch.Generator | None = None,
               device: torch.device | None = None) -> NetworkModule:
    """A freshly initialised module of the spec's type for one target (conv rank/alpha on 3x3 convolutions)."""
    rank, alpha = (spec.conv_rank, spec.conv_alpha) if target.is_conv_3x3 else (spec.rank, spec.alpha)
    common = dict(generator=generator, device=device, fused_part=target.fused_part)
    if spec.algo == "loha":
        return LoHaModule(target.key, target.module, rank, alpha, **common)
    if spec.algo == "lokr":
        geometry = layer_geometry(target.key, target.module, target.fused_part)
        layout = LokrLayout.plan(geometry, rank, spec.lokr_factor, spec.decompose_both)
        return LoKrModule(target.key, target.module, layout, alpha, **common)
    return LoRAModule(target.key, target.module, rank, alpha, dora=spec.dora, **common)


def _module_from_tensors(target: LoraTarget, tensors: dict[str, torch.Tensor], device: torch.device) -> NetworkModule:
    suffixes = set(tensors)
    for module_type in MODULE_TYPES:
        if module_type.accepts(suffixes):
            return module_type.from_tensors(target.key, target.module, tensors, device, target.fused_part)
    raise ValueError(f"{target.key}: tensors {', '.join(sorted(suffixes))} are no LoRA, LoHa or LoKr module that "
                     "Train Tools can load (LyCORIS's Tucker cores, lora_mid / hada_t1 / lokr_t2, and other types "
                     "are not supported)")
