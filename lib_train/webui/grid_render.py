"""Render epoch × weight preview cells through the WebUI's own txt2img pipeline, fast.

One network shaped like the run's files stays attached to the UNet; each epoch's tensors are copied into it
in place, and the W weights of a grid row are one batch of W images with the same seed, each sample carrying
its own Lora multiplier. Conditioning is computed per weight (the text encoder's Lora changes the prompt's and
the negative prompt's encodings), bypassing the WebUI's conditioning cache, whose key knows nothing of weights.
The text encoder's part is merged by the built-in Lora itself, as txt2img with ``<lora:epoch:w>`` does, so the
conditioning is bit for bit txt2img's: the WebUI's emphasis step divides by the conditioning's mean, and on
some models a last-bit difference there is the difference between a picture and NaN. Everything else is the
WebUI's: sampler, schedule, VAE, seeds and infotext.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from safetensors.torch import load_file

from ..common.errors import ConfigError
from ..common.i18n import tr
from ..hosts.protocol import ModelFamily
from ..engine.network import LoRANetwork
from ..preview.lora_batching import per_sample_unet_weights, text_encoder_weight
from .host import WebUI, WebUIHost


@dataclass(frozen=True)
class RenderSettings:
    """What every cell shares: the txt2img settings of the grid."""

    prompt: str
    negative_prompt: str
    sampler_name: str
    steps: int
    width: int
    height: int


@dataclass(frozen=True)
class ZValue:
    """One sub-grid: the seed and CFG scale of its cells."""

    seed: int
    cfg_scale: float


@dataclass
class RenderedCell:
    image: Image.Image
    infotext: str


class WebUIGridRenderer:
    """Cells keyed ``(weight index, epoch index, z index)``, as the X/Y/Z plot orders them."""

    def __init__(self, webui: WebUI, host: WebUIHost, *,
                 on_batch: Callable[[int, int, str], None] = lambda done, total, text: None,
                 stop_requested: Callable[[], bool] = lambda: False):
        self.webui = webui
        self.host = host
        self.processing_class = _grid_txt2img_class(webui)
        self.on_batch = on_batch
        self.stop_requested = stop_requested

    def render(self, settings: RenderSettings, epoch_files: Sequence[Path], weights: Sequence[float],
               z_values: Sequence[ZValue], network_for: Callable[[dict], LoRANetwork]) -> dict[tuple[int, int, int], RenderedCell]:
        if " AND " in f" {settings.prompt} ":
            raise ConfigError(tr("AND (composable) prompts are not supported in the preview grid."))
        cells: dict[tuple[int, int, int], RenderedCell] = {}
        total = len(epoch_files) * len(z_values)
        network: LoRANetwork | None = None
        try:
            for iy, path in enumerate(epoch_files):
                state = load_file(str(path))
                if network is None:
                    network = network_for(state)
                    network.attach()
                    if self._builtin_lora_available():
                        network.detach_text_encoder()  # the built-in Lora merges this part (text_encoder_at)
                else:
                    network.load_kohya_state_dict(state)  # same shape for every epoch of a run: swap in place
                for iz, z in enumerate(z_values):
                    if self.stop_requested():
                        return cells
                    done = iy * len(z_values) + iz
                    self.on_batch(done, total, tr("{file}, seed {seed}, CFG {cfg:g}", file=Path(path).stem, seed=z.seed,
                                                 cfg=z.cfg_scale))
                    images, infotexts = self._render_batch(network, Path(path).stem, settings, z, weights)
                    if self.stop_requested() or len(images) < len(weights):  # interrupted: half-sampled images
                        return cells
                    for ix, (image, infotext) in enumerate(zip(images, infotexts)):
                        cells[(ix, iy, iz)] = RenderedCell(image, _with_lora_tag(infotext, Path(path).stem, weights[ix]))
            self.on_batch(total, total, tr("done"))
            return cells
        finally:
            if network is not None:
                network.detach()

    def _builtin_lora_available(self) -> bool:
        return hasattr(self.webui.networks, "load_networks")

    @contextmanager
    def text_encoder_at(self, network: LoRANetwork, alias: str, weight: float) -> Iterator[None]:
        """The text encoder with the epoch's Lora at ``weight``, for one encoding: through the built-in Lora
        (text-encoder weight w, UNet weight 0: the UNet's part is the grid's own per-sample hooks), un-merged
        afterwards; through our hooks when the built-in Lora is not loaded."""
        if not self._builtin_lora_available():
            with text_encoder_weight(network, weight):
                yield
            return
        networks = self.webui.networks
        try:
            networks.load_networks([alias], [weight], [0.0], [None])
            if [net.name for net in networks.loaded_networks] != [alias]:
                raise ConfigError(tr("The WebUI's Lora cannot load {alias}; press Refresh on its Lora tab and try "
                                     "again.", alias=alias))
            yield
        finally:
            self.host.unmerge_builtin_lora()

    def _render_batch(self, network: LoRANetwork, alias: str, settings: RenderSettings, z: ZValue,
                      weights: Sequence[float]) -> tuple[list[Image.Image], list[str]]:
        processing = self.webui.processing
        p = self.processing_class(
            sd_model=self.webui.shared.sd_model,
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt,
            seed=[z.seed] * len(weights),  # every weight of the row at the cell's seed
            sampler_name=settings.sampler_name,
            batch_size=len(weights),
            n_iter=1,
            steps=settings.steps,
            cfg_scale=z.cfg_scale,
            width=settings.width,
            height=settings.height,
            do_not_save_samples=True,
            do_not_save_grid=True,
        )
        p.train_tools_weights = list(weights)
        p.train_tools_text_encoder_at = lambda weight: self.text_encoder_at(network, alias, weight)
        with closing(p), per_sample_unet_weights(network, self.host.unet, weights):
            processed = processing.process_images(p)
        return list(processed.images[:len(weights)]), list(processed.infotexts[:len(weights)])


_BATCH_FIELDS = re.compile(r"Batch (size|pos): \d+, ")


def _with_lora_tag(infotext: str, alias: str, weight: float) -> str:
    """The infotext of the equivalent single txt2img: the Lora in the prompt, no batch fields."""
    prompt, _, rest = infotext.partition("\n")
    return f"{prompt} <lora:{alias}:{weight:g}>\n{_BATCH_FIELDS.sub('', rest)}"


def _grid_txt2img_class(webui: WebUI):
    """txt2img whose conditioning is encoded once per Lora weight: sample i of the batch is encoded with the
    text encoder's Lora at weight i, its negative prompt too, as the built-in Lora would merge it."""
    base = webui.processing.StableDiffusionProcessingTxt2Img

    class GridTxt2Img(base):
        def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
            results = []
            for prompt, weight in zip(required_prompts, self.train_tools_weights):
                one = type(required_prompts)([prompt], copy_from=required_prompts)
                with webui.devices.autocast(), self.train_tools_text_encoder_at(weight):
                    results.append(function(webui.shared.sd_model, one, steps, hires_steps,
                                            webui.shared.opts.use_old_scheduling))
            if isinstance(results[0], list):  # negative prompts: a schedule per sample
                return [schedule for result in results for schedule in result]
            batch = [conds for result in results for conds in result.batch]  # prompts: multicond per sample
            return type(results[0])(shape=(len(batch),), batch=batch)

    return GridTxt2Img


@dataclass(frozen=True)
class BaseModelCheck:
    matches: bool
    trained_on: str
    loaded: str
    switch_to: str | None  # the title of the training checkpoint, when the WebUI knows it


def check_base_model(webui: WebUI, metadata: dict[str, str]) -> BaseModelCheck:
    """Is the loaded checkpoint the one the Lora was trained on? Compared by hash (the WebUI's legacy hash,
    which it always computes), else by SHA-256, else by file name."""
    info = webui.shared.sd_model.sd_checkpoint_info
    trained_name = metadata.get("ss_sd_model_name", "")
    trained_hash = metadata.get("ss_sd_model_hash", "")
    trained_sha = metadata.get("ss_new_sd_model_hash", "")

    def same(candidate) -> bool:
        if trained_hash and getattr(candidate, "hash", None):
            return candidate.hash == trained_hash
        if trained_sha and getattr(candidate, "sha256", None):
            return candidate.sha256 == trained_sha
        return Path(getattr(candidate, "filename", "")).name == trained_name

    if not (trained_name or trained_hash or trained_sha) or same(info):
        return BaseModelCheck(True, trained_name, info.title, None)
    sd_models = getattr(webui, "sd_models", None)
    match = next((c for c in getattr(sd_models, "checkpoints_list", {}).values() if same(c)), None)
    return BaseModelCheck(False, trained_name, info.title, match.title if match else None)


def lora_family(metadata: dict[str, str]) -> ModelFamily | None:
    """The family a LoRA file was trained for, read as the WebUI's Lora reads it (ss_base_model_version, ss_v2)."""
    if not metadata:
        return None
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return ModelFamily.SDXL
    if metadata.get("ss_v2") == "True":
        return ModelFamily.SD2
    return ModelFamily.SD1
