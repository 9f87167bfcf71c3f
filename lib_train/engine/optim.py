"""Optimizers, each a small description: where its class lives (also what kohya writes into ss_optimizer), the
package that provides it, the arguments Train Tools passes unless the user's optimizer arguments say otherwise,
and what is special about it (CUDA only, adaptive step size, schedule-free)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..common.errors import ConfigError
from ..common.i18n import N_, tr

# Set by their own settings (the learning-rate fields, weight decay), never through the optimizer arguments.
_RESERVED = {"params": "", "lr": "set the learning-rate fields instead",
             "weight_decay": "set the weight decay setting instead"}


@dataclass(frozen=True)
class OptimizerKind:
    name: str  # as kohya's --optimizer_type
    class_path: str  # module.Class, as kohya writes it into ss_optimizer
    package: str  # the pip package that provides it
    defaults: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)  # arguments that must keep this value here
    cuda_only: bool = False
    adaptive: bool = False  # estimates its own step size: the learning rate is a multiplier of it, ≈1.0
    schedule_free: bool = False  # averages its iterates: train()/eval() switch the weights, it needs no schedule
    hint: str = ""  # one line for the tab

    def load(self) -> type[torch.optim.Optimizer]:
        """The optimizer class; a ConfigError naming the package when it cannot be imported."""
        module, _, name = self.class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except Exception as error:  # a broken install (bitsandbytes without its CUDA library) raises more than ImportError
            raise ConfigError(tr("{name} needs the Python package {package}, which cannot be loaded here ({kind}: "
                                 "{error}). Install it (pip install {package}; the WebUI installs it at its next "
                                 "start) or choose another optimizer.", name=self.name, package=self.package,
                                 kind=type(error).__name__, error=error)) from None

    def check_arguments(self, arguments: dict[str, Any]) -> None:
        """Refuse arguments this optimizer does not take, reserved ones and changed fixed ones, naming them and what
        it accepts. The names are read from the class when its package is installed (otherwise building says so)."""
        for key, value in arguments.items():
            if key in _RESERVED:
                raise ConfigError(tr("Optimizer argument '{key}' is not set here: {value}.", key=key,
                                     value=_RESERVED[key] or 'it is internal'))
            if key in self.fixed and value != self.fixed[key]:
                raise ConfigError(tr("{name} runs here with {key}={value} (a fixed learning rate, as kohya "
                                     "recommends); {key}={value2} is not supported.", name=self.name, key=key,
                                     value=self.fixed[key], value2=value))
        try:
            accepted = self.accepted_arguments()
        except ConfigError:
            return
        unknown = sorted(set(arguments) - accepted)
        if unknown:
            raise ConfigError(tr("{name} has no argument {value}; it accepts: {value2}.", name=self.name,
                                 value=', '.join(unknown), value2=', '.join(sorted(accepted))))

    def accepted_arguments(self) -> set[str]:
        parameters = inspect.signature(self.load().__init__).parameters
        return {name for name, p in parameters.items() if name not in ("self", *_RESERVED)
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


OPTIMIZER_KINDS: dict[str, OptimizerKind] = {kind.name: kind for kind in (
    OptimizerKind("AdamW", "torch.optim.adamw.AdamW", "torch"),
    OptimizerKind("AdamW8bit", "bitsandbytes.optim.adamw.AdamW8bit", "bitsandbytes", cuda_only=True,
                  hint=N_("AdamW with 8-bit state (a quarter of AdamW's memory); CUDA GPUs only.")),
    OptimizerKind("Lion", "lion_pytorch.lion_pytorch.Lion", "lion-pytorch",
                  hint=N_("Lion: take a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.")),
    OptimizerKind("Lion8bit", "bitsandbytes.optim.lion.Lion8bit", "bitsandbytes", cuda_only=True,
                  hint=N_("Lion with 8-bit state; CUDA GPUs only. Learning rate 3-10x smaller than AdamW's.")),
    # The arguments Prodigy's authors recommend for diffusion models.
    OptimizerKind("Prodigy", "prodigyopt.prodigy.Prodigy", "prodigyopt", adaptive=True,
                  defaults={"decouple": True, "use_bias_correction": True, "safeguard_warmup": True},
                  hint=N_("Prodigy finds its own step size: learning rates 1.0 (d_coef=0.5 in the arguments leans lower).")),
    OptimizerKind("DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam", "dadaptation", adaptive=True,
                  defaults={"decouple": True},
                  hint=N_("D-Adaptation finds its own step size: learning rates 1.0.")),
    # kohya's recommended Adafactor for LoRA: a fixed learning rate, no parameter scaling, no warmup init.
    OptimizerKind("Adafactor", "transformers.optimization.Adafactor", "transformers",
                  defaults={"scale_parameter": False}, fixed={"relative_step": False, "warmup_init": False},
                  hint=N_("Adafactor with a fixed learning rate (kohya's arguments); constant_with_warmup suits it.")),
    OptimizerKind("AdamWScheduleFree", "schedulefree.adamw_schedulefree.AdamWScheduleFree", "schedulefree",
                  schedule_free=True,
                  hint=N_("Schedule-free AdamW: choose the constant scheduler; warmup steps go to the optimizer.")),
)}


def optimizer_kind(name: str) -> OptimizerKind:
    try:
        return OPTIMIZER_KINDS[name]
    except KeyError:
        raise ConfigError(tr("Optimizer must be one of {value} (got {name!r}).", value=', '.join(OPTIMIZER_KINDS),
                             name=name)) from None


def optimizer_arguments(kind: OptimizerKind, weight_decay: float, user_arguments: dict[str, Any],
                        warmup: int) -> dict[str, Any]:
    """Every argument beside the parameters and learning rate, in the order ss_optimizer lists them."""
    arguments = {"weight_decay": weight_decay, **kind.defaults, **kind.fixed}
    if kind.schedule_free:
        arguments["warmup_steps"] = warmup  # its own warmup, as no schedule runs beside it
    arguments.update(user_arguments)
    return arguments


def describe_optimizer(kind: OptimizerKind, arguments: dict[str, Any]) -> str:
    """The optimizer as kohya writes it into ss_optimizer: ``module.Class(key=value,...)``."""
    listed = ",".join(f"{key}={value}" for key, value in arguments.items())
    return f"{kind.class_path}({listed})" if listed else kind.class_path


def check_device(kind: OptimizerKind, device: torch.device) -> None:
    if kind.cuda_only and device.type != "cuda":
        alternative = "Lion" if kind.name.startswith("Lion") else "AdamW"
        raise ConfigError(tr("{name} runs on a CUDA GPU only and this run is on the {value}; choose {alternative}.",
                             name=kind.name, value=device.type.upper(), alternative=alternative))


def make_optimizer(kind: OptimizerKind, groups: list[dict], arguments: dict[str, Any],
                   device: torch.device) -> torch.optim.Optimizer:
    """The optimizer over the parameter groups (each with its own lr), in training mode."""
    check_device(kind, device)
    optimizer_class = kind.load()
    kind.check_arguments({k: v for k, v in arguments.items() if k != "weight_decay"})
    internal = {}
    if kind.name == "AdamW" and not {"fused", "foreach"} & set(arguments):
        # The fused kernel is exact and faster on CUDA; the foreach path is the fast one on CPU.
        fused = device.type == "cuda"
        internal = {"fused": fused, "foreach": None if fused else True}
    try:
        optimizer = optimizer_class(groups, lr=groups[0]["lr"], **arguments, **internal)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        raise ConfigError(tr("{name} refused its arguments ({value}): {value2}", name=kind.name,
                             value=describe_optimizer(kind, arguments), value2=error or type(error).__name__)) from None
    if kind.schedule_free:
        optimizer.train()
    return optimizer


@contextmanager
def evaluation_weights(optimizers: list[torch.optim.Optimizer]) -> Iterator[None]:
    """Schedule-free optimizers train at an interpolation of their averaged weights: what is saved or evaluated
    inside this block are the averaged weights (eval mode); training resumes where it was afterwards."""
    switching = [o for o in optimizers if callable(getattr(o, "eval", None)) and callable(getattr(o, "train", None))]
    for optimizer in switching:
        optimizer.eval()
    try:
        yield
    finally:
        for optimizer in switching:
            optimizer.train()


def effective_learning_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's step size: its learning rate, times the adaptive optimizers' estimate d (Prodigy, D-Adaptation)."""
    return [group["lr"] * group.get("d", 1.0) for group in optimizer.param_groups]
