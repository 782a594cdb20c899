"""What the DeepFloyd IF pipelines share: components, T5 prompts, the guided pixel loop, outputs.

Each IF stage is a pixel-space DDPM with a learned-range variance (6 output channels) and dynamic
thresholding; the guidance combine, the thresholding and the update run in the scheduler's one fused
guided_step, with the variance channels taken from the text branch, as IF does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from diffkern import schedulers
from diffkern.models.t5 import MAX_LENGTH, encode_t5
from diffkern.pipelines import _common as C
from diffkern.pipelines.if_timesteps import if_timesteps
from diffkern.schedulers._base import randn_like_diffusers

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class IFPipelineOutput:
    """diffusers' IFPipelineOutput: `images` (PIL list, (B, H, W, 3) array in [0, 1], or with
    output_type="pt" the raw (B, 3, H, W) sample in [-1, 1], which the next stage takes);
    `nsfw_detected` / `watermark_detected`: per-image flags, None without a safety checker."""

    images: object
    nsfw_detected: list | None = None
    watermark_detected: list | None = None

    def __getitem__(self, i):
        return self.to_tuple()[i]

    def to_tuple(self):
        return (self.images, self.nsfw_detected, self.watermark_detected)


def as_diffkern_scheduler(scheduler, name="scheduler"):
    """A diffkern scheduler: ours as it is; a diffusers DDPMScheduler / DDIMScheduler rebuilt from its
    config (the same betas, variance type and thresholding), so components built for diffusers drop in."""
    if scheduler is None:
        raise ValueError(f"{name}: required (a DDPMScheduler)")
    cls = type(scheduler)
    if cls.__module__.split(".")[0] == "diffusers" and cls.__name__ in ("DDPMScheduler", "DDIMScheduler"):
        return getattr(schedulers, cls.__name__).from_config(scheduler.config)
    return C.make_scheduler(scheduler, None)


def resolve_timesteps(timesteps):
    """None, a list of descending ints, or the name of one of IF's lists ("smart50", "super27"...)."""
    if isinstance(timesteps, str):
        return if_timesteps(timesteps)
    if timesteps is None:
        return None
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.tolist()
    if not isinstance(timesteps, (list, tuple)) or not timesteps or \
            not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in timesteps):
        raise ValueError(f"timesteps: expected a name of IF's schedules or a non-empty list of ints, "
                         f"got {timesteps!r}")
    return [int(t) for t in timesteps]


def unet_call(unet, x, t, context, class_labels=None, cross_attention_kwargs=None):
    """The UNet's output as a tensor; diffkern's and diffusers' UNets alike (keywords only when set)."""
    kw = {}
    if class_labels is not None:
        kw["class_labels"] = class_labels
    if cross_attention_kwargs is not None:
        kw["cross_attention_kwargs"] = cross_attention_kwargs
    out = unet(x, t, encoder_hidden_states=context, **kw)
    return out if isinstance(out, torch.Tensor) else out[0]


class IFPipelineBase:
    """Components and the steps every IF stage shares (diffusers' IF constructor arguments).

    tokenizer / text_encoder (transformers T5) are optional when prompt_embeds are given; the
    safety checker, its feature extractor and the watermarker are optional and skipped (a warning
    says so) when absent. scheduler: a diffkern DDPMScheduler (a diffusers one is converted).
    """

    def __init__(self, tokenizer, text_encoder, unet, scheduler, safety_checker=None, feature_extractor=None,
                 watermarker=None, requires_safety_checker=True):
        self.tokenizer, self.text_encoder, self.unet = tokenizer, text_encoder, unet
        self.scheduler = as_diffkern_scheduler(scheduler)
        self.safety_checker, self.feature_extractor = safety_checker, feature_extractor
        self.watermarker = watermarker
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("feature_extractor: required with a safety_checker "
                             "(or pass safety_checker=None)")
        self.notes = []
        if safety_checker is None:
            self.notes.append("safety checker: absent, images are not checked")
            if requires_safety_checker:
                logger.warning("%s: no safety checker; images are not checked. Abide by the IF license and "
                               "do not expose unfiltered results publicly.", type(self).__name__)
        if watermarker is None:
            self.notes.append("watermarker: absent, PIL images are not watermarked")
        self.progress = True
        self._check_text_width()

    _extra_schedulers = ()  # scheduler components besides `scheduler` (stage II: image_noising_scheduler)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device="cpu", variant=None):
        """Load a diffusers IF folder (IF-I-*, IF-II-*: model_index.json, unet/, scheduler/, text_encoder/
        and tokenizer/ when present) with diffkern.models.loading.load. The safety checker and the
        watermarker are not loaded (`notes` says so)."""
        from diffkern.models.loading import load

        return cls.from_loaded(load(path, dtype=dtype, device=device, variant=variant))

    @classmethod
    def from_loaded(cls, loaded):
        """Build from what diffkern.models.loading.load returned for an IF folder."""
        parts = loaded.components
        if loaded.unet is None:
            raise ValueError(f"loaded: {loaded.source} has no unet")
        extra = {}
        for name in cls._extra_schedulers:
            if parts.get(name) is None:
                raise ValueError(f"loaded: {loaded.source} has no {name} (is it a stage II folder?)")
            extra[name] = schedulers.DDPMScheduler.from_config(parts[name])
        pipe = cls(tokenizer=parts.get("tokenizer"), text_encoder=parts.get("text_encoder"), unet=loaded.unet,
                   scheduler=schedulers.DDPMScheduler.from_config(loaded.scheduler_config),
                   requires_safety_checker=False, **extra)
        pipe.notes += list(loaded.notes)
        return pipe

    def to(self, device=None, dtype=None):
        """Move (and cast) the UNet and the text encoder; returns self."""
        for m in (self.unet, self.text_encoder):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    # -- properties ------------------------------------------------------------------------------
    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def set_progress_bar_config(self, disable=False):
        """Turn the tqdm bar off (disable=True) or on, as diffusers' method of that name."""
        self.progress = not disable

    def _text_width(self):
        """The embedding width the UNet takes: encoder_hid_dim (IF's projection), else cross_attention_dim."""
        cfg = self.unet.config
        width = getattr(cfg, "encoder_hid_dim", None) or getattr(cfg, "cross_attention_dim", None)
        return width if isinstance(width, int) else None

    def _check_text_width(self):
        width = self._text_width()
        d_model = getattr(getattr(self.text_encoder, "config", None), "d_model", None)
        if width is not None and d_model is not None and d_model != width:
            raise ValueError(f"text_encoder: its hidden size {d_model} does not match the UNet's text "
                             f"embedding width {width} (encoder_hid_dim / cross_attention_dim)")

    # -- prompts ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt, do_classifier_free_guidance=True, num_images_per_prompt=1, device=None,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                      clean_caption=False):
        """(prompt_embeds, negative_prompt_embeds) as diffusers' IFPipeline.encode_prompt: T5 states
        of 77 tokens, each prompt's rows repeated num_images_per_prompt times; the negative is None
        without guidance, encoded from negative_prompt ("" by default) when not given."""
        if prompt is not None and negative_prompt is not None and type(prompt) is not type(negative_prompt):
            raise TypeError(f"negative_prompt: expected the type of prompt ({type(prompt).__name__}), "
                            f"got {type(negative_prompt).__name__}")
        device = device or self.device
        if prompt is None:
            batch = prompt_embeds.shape[0]
        else:
            batch = 1 if isinstance(prompt, str) else len(prompt)
        if prompt_embeds is None:
            prompt_embeds = self._encode(C.prompt_list(prompt), MAX_LENGTH, clean_caption)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            if negative_prompt is None:
                negatives = [""] * batch
            elif isinstance(negative_prompt, str):
                negatives = [negative_prompt]
            elif len(negative_prompt) != batch:
                raise ValueError(f"negative_prompt: got {len(negative_prompt)} negative prompts for "
                                 f"{batch} prompts")
            else:
                negatives = list(negative_prompt)
            negative_prompt_embeds = self._encode(negatives, prompt_embeds.shape[1], clean_caption,
                                                  "negative_prompt_embeds")
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
        return prompt_embeds, negative_prompt_embeds.repeat_interleave(num_images_per_prompt, 0)

    def _encode(self, prompts, max_length, clean, needed="prompt_embeds"):
        if self.text_encoder is None or self.tokenizer is None:
            what = "prompt" if needed == "prompt_embeds" else "negative_prompt"
            raise ValueError(f"{what}: this pipeline has no text_encoder / tokenizer (IF-II folders ship "
                             f"none); pass {needed} (e.g. from stage I's encode_prompt)")
        return encode_t5(self.text_encoder, self.tokenizer, prompts, max_length=max_length, clean=clean)

    def _check_prompts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, callback_steps):
        """diffusers' IF check_inputs on the prompt arguments; returns the number of prompts."""
        if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps <= 0:
            raise ValueError(f"callback_steps: expected a positive int, got {callback_steps!r}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("prompt, prompt_embeds: give one of them, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: required (a str or a list of str), unless prompt_embeds is given")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("negative_prompt, negative_prompt_embeds: give one of them, not both")
        width = self._text_width()
        for name, e in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if e is not None:
                C.check_embeds(name, e)
                if width is not None and e.shape[2] != width:
                    raise ValueError(f"{name}: expected width {width} (the UNet's encoder_hid_dim / "
                                     f"cross_attention_dim), got shape {tuple(e.shape)}")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds: expected the shape of prompt_embeds "
                             f"{tuple(prompt_embeds.shape)}, got {tuple(negative_prompt_embeds.shape)}")
        if prompt is None:
            return prompt_embeds.shape[0]
        return len(C.prompt_list(prompt))

    def _context(self, prompt, negative_prompt, per_prompt, guided, prompt_embeds, negative_prompt_embeds,
                 clean_caption):
        cond, uncond = self.encode_prompt(prompt, guided, per_prompt, self.device, negative_prompt,
                                          prompt_embeds, negative_prompt_embeds, clean_caption)
        context = torch.cat([uncond, cond]) if guided else cond
        return context.to(self.dtype)

    # -- sampling --------------------------------------------------------------------------------
    def _set_timesteps(self, num_inference_steps, timesteps):
        """Custom (or named) timesteps when given, else num_inference_steps evenly spaced."""
        timesteps = resolve_timesteps(timesteps)
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps, device=self.device)
        else:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                    or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return self.scheduler.timesteps

    def _size(self, value, name):
        value = value or self.unet.config.sample_size
        smallest = 2 ** (len(getattr(self.unet.config, "block_out_channels", (0,))) - 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ValueError(f"{name}: expected an int >= {smallest} (this UNet downsamples "
                             f"{len(self.unet.config.block_out_channels) - 1} times), got {value!r}")
        return value

    def _denoise(self, x, timesteps, context, guidance_scale, generator, *, extra=None, class_labels=None,
                 cross_attention_kwargs=None, mask=None, callback=None, callback_steps=1, progress=None):
        """The reverse process over `timesteps` from x. Under guidance one UNet call on [x; x]; the
        scheduler's fused step takes (cond, uncond) and combines the eps channels only (the variance
        channels come from the text branch). `extra`: channels appended to the UNet input (stage II's
        noised upscale), or a function returning them for the whole guided batch at each call; `mask`:
        inpainting's blend, x = (1 - m) x_prev + m x_new after each step."""
        guided = guidance_scale > 1.0
        C_img = x.shape[1]
        learned = self.scheduler.config.variance_type in ("learned", "learned_range")
        enabled = self.progress if progress is None else progress
        from diffkern.schedulers.sampling import _progress

        for i, t in enumerate(_progress(timesteps, enabled, len(timesteps))):
            if callable(extra):  # drawn afresh per call, one block of rows per guidance half
                x_in = torch.cat([torch.cat([x, x]) if guided else x, extra()], dim=1)
            else:
                x_in = torch.cat([x, extra], dim=1) if extra is not None else x
                x_in = torch.cat([x_in, x_in]) if guided else x_in
            x_in = self.scheduler.scale_model_input(x_in, t)
            out = unet_call(self.unet, x_in, t, context, class_labels, cross_attention_kwargs)
            if not learned:  # a fixed-variance scheduler reads the eps channels only
                out = out[:, :C_img]
            if guided:
                uncond, cond = out.chunk(2)
                prev = self.scheduler.step(cond, t, x, generator=generator, uncond_output=uncond,
                                           guidance_scale=guidance_scale, return_dict=False)[0]
            else:
                prev = self.scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
            x = prev if mask is None else (1 - mask) * x + mask * prev
            if callback is not None and i % callback_steps == 0:
                callback(i, t, x)
        return x

    def _noise(self, shape, generator):
        return randn_like_diffusers(tuple(shape), generator, self.device, self.dtype)

    # -- output ----------------------------------------------------------------------------------
    def _finish(self, x, output_type, return_dict):
        """diffusers' IF output: "pt" the raw sample (for the next stage), "np" / "pil" in [0, 1],
        through the safety checker and (PIL) the watermarker when the pipeline has them."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")
        nsfw = watermark = None
        images = x
        if output_type != "pt":
            images = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
            images, nsfw, watermark = self.run_safety_checker(images)
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(a) for a in (images * 255).round().astype("uint8")]
                if self.watermarker is not None:
                    images = self.watermarker.apply_watermark(images, self.unet.config.sample_size)
        out = IFPipelineOutput(images, nsfw, watermark)
        return out if return_dict else out.to_tuple()

    def run_safety_checker(self, images):
        """(images, nsfw_detected, watermark_detected): the IF safety checker's verdicts (flagged images
        blacked out), or the images unchanged and None, None without one."""
        if self.safety_checker is None:
            return images, None, None
        from PIL import Image

        pils = [Image.fromarray(a) for a in (images * 255).round().astype("uint8")]
        clip_input = self.feature_extractor(pils, return_tensors="pt").pixel_values
        clip_input = clip_input.to(device=self.device, dtype=self.dtype)
        return self.safety_checker(images=images, clip_input=clip_input)
