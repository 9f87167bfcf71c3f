"""Sample pictures during training: every N epochs or steps, each sample prompt rendered with the network being
trained attached at the prompt's multiplier, saved as PNG with its infotext.

The engine does not render: the host's glue hands in a renderer (the WebUI's txt2img on the live model; a
command-line run has none and renders nothing). What the engine guarantees is that rendering leaves the
training exactly where it was: no gradient, every module in eval mode for the render and back in its mode
after, the multipliers back at theirs, and every random generator the training draws from (torch's global CPU
and CUDA ones, the run's own generator, Python's ``random``, NumPy's) restored, so a run with samples saves the
same file as one without (tests/test_samples.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..common.files import png_bytes, write_atomically
from ..common.i18n import tr
from ..hosts.protocol import Progress, TrainingHost
from .optim import evaluation_weights
from .sample_prompts import SamplePrompt, folder_tag_counts, made_prompts, parse_sample_prompts
from .steps import Run, StopRequested

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass
class RenderedSample:
    image: Image.Image
    infotext: str  # the WebUI's "parameters" text: prompt, negative prompt, then "Steps: …, Seed: …"


# Renders one prompt on the host's model as it is now; None when the user interrupted it.
SampleRenderer = Callable[[SamplePrompt], "RenderedSample | None"]


@dataclass(frozen=True)
class SampleImage:
    epoch: int
    step: int
    index: int  # the prompt's position
    path: Path


@dataclass
class TrainingSamples:
    """What the loop calls after each step and each epoch; renders when one of the schedules is due."""

    prompts: list[SamplePrompt]  # resolved: every field set
    renderer: SampleRenderer
    folder: Path
    run_name: str
    total_epochs: int
    every_n_epochs: int = 0
    every_n_steps: int = 0
    images: list[SampleImage] = field(default_factory=list, init=False)
    failure: str = field(default="", init=False)  # the error that ended sampling; the training went on without samples
    _last_step: int = field(default=-1, init=False, repr=False)

    @classmethod
    def for_config(cls, config: "TrainConfig", renderer: SampleRenderer, folder: Path) -> "TrainingSamples":
        """The run's samples: its prompt lines, or prompts made from its trigger words and captions."""
        written = parse_sample_prompts(config.sample_prompts)
        prompts = written or made_prompts(config.trigger_words, folder_tag_counts(config.train_dir), config.sample_count)
        resolved = [prompt.resolved(index, resolution=config.resolution, seed=config.seed, steps=config.sample_steps,
                                    cfg_scale=config.sample_cfg_scale, sampler=config.sample_sampler)
                    for index, prompt in enumerate(prompts)]
        return cls(resolved, renderer, Path(folder), config.name, config.epochs, config.sample_every_n_epochs,
                   config.sample_every_n_steps)

    def after_step(self, host: TrainingHost, run: Run, epoch: int, step: int, total_steps: int) -> None:
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._render_all(host, run, epoch, step, total_steps)

    def after_epoch(self, host: TrainingHost, run: Run, epoch: int, step: int, total_steps: int) -> None:
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self._render_all(host, run, epoch, step, total_steps)

    def _render_all(self, host: TrainingHost, run: Run, epoch: int, step: int, total_steps: int) -> None:
        if self.failure or step == self._last_step:  # both schedules due at an epoch's last step: render once
            return
        self._last_step = step
        where = dict(step=step, total_steps=total_steps, epoch=epoch, total_epochs=self.total_epochs)
        done: list[SampleImage] = []
        try:
            with apart_from_training(host, run):
                for index, prompt in enumerate(self.prompts):
                    host.report(Progress("sampling", **where, message=tr(
                        "Sample {number}/{count} of epoch {epoch}: {prompt}", number=index + 1,
                        count=len(self.prompts), epoch=epoch, prompt=prompt.prompt)))
                    run.network.set_multiplier(prompt.multiplier)
                    rendered = self.renderer(prompt)
                    if rendered is None or host.should_stop():  # interrupted: a half-sampled picture is not kept
                        raise StopRequested
                    done.append(self._save(rendered, prompt, epoch, step, index))
        except StopRequested:
            raise
        except Exception as error:  # a failed sample (NaN, out of memory) must not cost the training
            self.failure = tr("Samples stopped at epoch {epoch}: {kind}: {error}", epoch=epoch,
                              kind=type(error).__name__, error=error)
            host.report(Progress("samples-failed", **where, message=self.failure + tr(" Training goes on."),
                                 saved_files=[str(image.path) for image in done]))
            return
        finally:
            self.images.extend(done)
        host.report(Progress("sampled", **where, message=tr("Samples of epoch {epoch} (step {step}) saved.",
                                                            epoch=epoch, step=step),
                             saved_files=[str(image.path) for image in done]))

    def _save(self, rendered: RenderedSample, prompt: SamplePrompt, epoch: int, step: int, index: int) -> SampleImage:
        path = self.folder / f"e{epoch:03d}_s{step:06d}_{index:02d}.png"
        infotext = _with_sample_fields(rendered.infotext, self.run_name, epoch, step, prompt.multiplier)
        write_atomically(path, png_bytes(rendered.image, infotext), overwrite=False)
        return SampleImage(epoch, step, index, path)


def _with_sample_fields(infotext: str, name: str, epoch: int, step: int, multiplier: float) -> str:
    """The WebUI reads its parameters from the infotext's last line: the sample's origin goes there too."""
    origin = f'Train Tools sample: "{name.replace(chr(34), "")} epoch {epoch} step {step}", Lora multiplier: {multiplier:g}'
    return f"{infotext}, {origin}" if infotext else origin


@contextmanager
def apart_from_training(host: TrainingHost, run: Run) -> Iterator[None]:
    """The block may run the model for inference; afterwards training continues exactly as without it."""
    roots = [host.unet, *(encoder.module for encoder in host.text_encoders), run.network]
    modes = [(module, module.training) for root in roots for module in root.modules()]
    multipliers = [(module, module.multiplier) for module in run.network.modules_in_order()]
    states = _RandomStates.capture(run.generator)
    try:
        with torch.no_grad(), evaluation_weights(run.optimizers):  # schedule-free: render the averaged weights
            for root in roots:
                root.eval()
            yield
    finally:
        states.restore()
        for module, mode in modes:
            module.training = mode
        for module, multiplier in multipliers:
            module.multiplier = multiplier


@dataclass
class _RandomStates:
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    run_generator: torch.Tensor
    generator: torch.Generator
    python: object
    numpy: dict

    @classmethod
    def capture(cls, generator: torch.Generator) -> "_RandomStates":
        # The WebUI seeds noise with torch.manual_seed, which reseeds every CUDA device too.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda, generator.get_state(), generator, random.getstate(),
                   np.random.get_state(legacy=False))

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        self.generator.set_state(self.run_generator)
        random.setstate(self.python)
        np.random.set_state(self.numpy)
