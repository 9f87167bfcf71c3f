"""A small txt2img with the WebUI's shapes, for the stand-in WebUI: prompt_parser's conditioning objects and
dedup, the class-level conditioning cache, ``get_conds_with_caching``, per-sample seeds drawn as the WebUI draws
them (the global generator, reseeded), an Euler sampler (and Euler a, whose noise comes from the global
generator) with classifier-free guidance that calls the UNet on cond and uncond rows together, the VAE decode one sample at a
time, and the WebUI's NaN checks (on the first element of the UNet's output, and of each decoded sample).

The model is the real tiny SD1; only the WebUI's plumbing is imitated. The grid code must work through this
exactly as through the WebUI (it overrides ``get_conds_with_caching`` and hooks the UNet)."""

from __future__ import annotations

import contextlib
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from lib_train.hosts.sd1 import VAE_SCALE_FACTOR

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
ComposableScheduledPromptConditioning = namedtuple("ComposableScheduledPromptConditioning", ["schedules", "weight"])


class NansException(Exception):
    pass


def test_for_nans(x: torch.Tensor, where: str) -> None:
    """As the WebUI's devices.test_for_nans: only the first element is looked at."""
    if torch.isnan(x[(0,) * x.ndim]):
        raise NansException(f"A tensor with NaNs was produced in {where}.")


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """Like prompt_parser's: identical prompts are encoded once (no schedules in the stand-in)."""
    cache, result = {}, []
    for prompt in prompts:
        if prompt not in cache:
            cond = model.get_learned_conditioning([prompt])
            cache[prompt] = [ScheduledPromptConditioning(steps, cond[0])]
        result.append(cache[prompt])
    return result


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    learned = get_learned_conditioning(model, prompts, steps, hires_steps, use_old_scheduling)
    return MulticondLearnedConditioning((len(prompts),), [[ComposableScheduledPromptConditioning(s, 1.0)] for s in learned])


class StableDiffusionProcessing:
    cached_c = [None, None]
    cached_uc = [None, None]

    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=-1, sampler_name="Euler", batch_size=1,
                 n_iter=1, steps=4, cfg_scale=7.0, width=64, height=64, do_not_save_samples=False,
                 do_not_save_grid=False):
        self.sd_model, self.prompt, self.negative_prompt, self.seed = sd_model, prompt, negative_prompt, seed
        self.sampler_name, self.batch_size, self.n_iter, self.steps = sampler_name, batch_size, n_iter, steps
        self.cfg_scale, self.width, self.height = cfg_scale, width, height
        self.closed = False

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        key = (tuple(required_prompts), steps)
        for cache in caches:
            if cache[0] == key:
                return cache[1]
        caches[0][1] = function(self.sd_model, required_prompts, steps, hires_steps, False)
        caches[0][0] = key
        return caches[0][1]

    def setup_conds(self):
        self.uc = self.get_conds_with_caching(get_learned_conditioning,
                                              SdConditioning(self.negative_prompts, is_negative_prompt=True),
                                              self.steps, [self.cached_uc], None)
        self.c = self.get_conds_with_caching(get_multicond_learned_conditioning, SdConditioning(self.prompts),
                                             self.steps, [self.cached_c], None)

    def close(self):
        self.closed = True


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


def _sigmas(alphas_cumprod: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    all_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    timesteps = torch.linspace(len(all_sigmas) - 1, 0, steps).round().long()
    return torch.cat([all_sigmas[timesteps], torch.zeros(1)]), timesteps


def _randn(seed: int, shape: tuple) -> torch.Tensor:
    """As the WebUI's rng.randn: the global generator, reseeded (which is why training must keep its own state)."""
    torch.manual_seed(seed)
    return torch.randn(shape)


def process_images(p, state) -> SimpleNamespace:
    p.prompts = [p.prompt] * p.batch_size
    p.negative_prompts = [p.negative_prompt] * p.batch_size
    seeds = p.seed if isinstance(p.seed, list) else [p.seed + i for i in range(p.batch_size)]
    model = p.sd_model
    with torch.no_grad():
        p.setup_conds()
        cond = torch.stack([p.c.batch[i][0].schedules[0].cond for i in range(p.batch_size)])
        uncond = torch.stack([p.uc[i][0].cond for i in range(p.batch_size)])
        sigmas, timesteps = _sigmas(model.alphas_cumprod_original, p.steps)
        latent_shape = (4, p.height // 8, p.width // 8)
        x = torch.stack([_randn(s, latent_shape) for s in seeds]) * sigmas[0]
        ancestral = p.sampler_name.endswith(" a")
        for i in range(p.steps):
            if state.interrupted:
                break
            scale = 1 / (sigmas[i] ** 2 + 1).sqrt()
            rows = torch.cat([x, x]) * scale
            t = timesteps[i].repeat(rows.shape[0])
            output = model.apply_model(rows, t, torch.cat([cond, uncond]))
            test_for_nans(output, "Unet")
            eps_cond, eps_uncond = output.chunk(2)
            eps = eps_uncond + p.cfg_scale * (eps_cond - eps_uncond)
            if ancestral:  # k-diffusion's Euler ancestral: a step down, then fresh noise from the global generator
                up = torch.minimum(sigmas[i + 1], (sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2).sqrt())
                down = (sigmas[i + 1] ** 2 - up ** 2).sqrt()
                x = x + eps * (down - sigmas[i]) + torch.randn_like(x) * up
            else:
                x = x + eps * (sigmas[i + 1] - sigmas[i])
        decoded = [model.first_stage_model.decode(sample[None] / VAE_SCALE_FACTOR)[0] for sample in x]
        for sample in decoded:
            test_for_nans(sample, "VAE")
    images = [Image.fromarray(((d.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy().astype(np.uint8))
              for d in decoded]
    batch = f"Batch size: {p.batch_size}, Batch pos: {{}}, " if p.batch_size > 1 else ""
    infotexts = [f"{p.prompt}\nNegative prompt: {p.negative_prompt}\nSteps: {p.steps}, Sampler: {p.sampler_name}, "
                 f"CFG scale: {p.cfg_scale:g}, Seed: {seed}, Size: {p.width}x{p.height}, {batch.format(i)}Model: tiny"
                 for i, seed in enumerate(seeds)]
    return SimpleNamespace(images=images, infotexts=infotexts)


def install_txt2img(webui) -> None:
    """Give the stand-in WebUI its processing module and what the grid needs around it."""
    processing = webui.processing
    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    processing.process_images = lambda p: process_images(p, webui.shared.state)
    StableDiffusionProcessing.cached_c, StableDiffusionProcessing.cached_uc = [None, None], [None, None]
    webui.devices.autocast = contextlib.nullcontext
    webui.shared.opts.use_old_scheduling = False
    webui.sd_models = SimpleNamespace(checkpoints_list={webui.shared.sd_model.sd_checkpoint_info.title:
                                                        webui.shared.sd_model.sd_checkpoint_info})
