"""Which network a run trains, and how kohya's sd-scripts records it in the file.

Plain LoRA and LoCon are kohya's own ``networks.lora`` (attention layers; with a conv rank, also the ResBlocks'
and samplers' layers). LoHa, LoKr and DoRA exist only in LyCORIS, so those files are what ``lycoris.kohya``
writes: its default layer set (preset "full"), its tensors, and the ``--network_args`` that rebuild the same
network in sd-scripts (``ss_network_args``, values as strings, sd-scripts adding ``dropout``).
"""

from __future__ import annotations

from dataclasses import dataclass

LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr"}


@dataclass(frozen=True)
class NetworkSpec:
    network_type: str = "lora"  # lora, locon, loha or lokr (validated by TrainConfig)
    rank: int = 16
    alpha: float = 8.0
    conv_rank: int = 0
    conv_alpha: float = 1.0
    dora: bool = False
    lokr_factor: int = -1
    decompose_both: bool = False

    @classmethod
    def of(cls, config) -> "NetworkSpec":
        """The spec of a TrainConfig."""
        return cls(config.network_type, config.rank, config.alpha, config.conv_rank, config.conv_alpha, config.dora,
                   config.lokr_factor, config.decompose_both)

    @property
    def algo(self) -> str:
        """The module type: lora (LoCon included), loha or lokr."""
        return "lora" if self.network_type == "locon" else self.network_type

    @property
    def with_convs(self) -> bool:
        return self.conv_rank > 0

    @property
    def lycoris(self) -> bool:
        """Written as LyCORIS writes it (its layers, ``lycoris.kohya``), not as kohya's networks.lora."""
        return self.algo != "lora" or self.dora

    @property
    def label(self) -> str:
        name = "LoCon" if self.algo == "lora" and self.with_convs else LABELS[self.network_type]
        return f"{name} + DoRA" if self.dora else name

    def ss_network_module(self) -> str:
        return "lycoris.kohya" if self.lycoris else "networks.lora"

    def ss_network_args(self) -> dict | None:
        if not self.lycoris:
            if not self.with_convs:
                return None
            return {"conv_dim": str(self.conv_rank), "conv_alpha": str(self.conv_alpha), "dropout": None}
        args: dict = {"algo": ("locon" if self.with_convs else "lora") if self.algo == "lora" else self.algo,
                      # LyCORIS gives convs the linear rank unless told otherwise, so "0" is written out.
                      "conv_dim": str(self.conv_rank)}
        if self.with_convs:
            args["conv_alpha"] = str(self.conv_alpha)
        if self.algo == "lokr":
            args["factor"] = str(self.lokr_factor)
            if self.decompose_both:  # LyCORIS reads any string here as true, "False" included
                args["decompose_both"] = "True"
        if self.dora:
            args.update(dora_wd="True", wd_on_output="False")  # the axis A1111 applies (network_dora)
        args["dropout"] = None
        return args
