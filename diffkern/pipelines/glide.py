"""GLIDE text-to-image, CLIP-guided and inpainting pipelines (OpenAI's notebooks, end to end).

    pipe = GlidePipeline.from_checkpoints("base.pt", "upsample.pt", tokenizer="glide_tokenizer/")
    image = pipe("an oil painting of a corgi", generator=torch.Generator().manual_seed(0)).images[0]

What each call does, as OpenAI's notebooks (text2im, clip_guided, inpaint) do:

- base 64 x 64: DDPM (p_sample_loop) with the learned variance over base_respacing ("100") steps,
  x0 clamped to [-1, 1]; classifier-free guidance with the empty prompt (all end tokens, mask
  False) as the unconditional row, both rows in one model call; or, with use_clip_guidance, no
  free guidance and the noised CLIP's gradient as cond_fn.
- upsampler 64 -> 256: DDIM (eta 0) over upsample_respacing ("fast27") steps, no guidance, the base
  samples quantised to 8 bits as low_res, x_T = noise * upsample_temp (0.997).
- inpainting: both stages sample with DDPM; the models see image * mask and mask, and after each x0
  prediction the known region (mask 1) is put back (the notebook's denoised_fn).

Differences: x_T and every step's noise come from `generator` (OpenAI draws from the global RNG), and
only the conditional half of the guided batch is sampled (OpenAI samples both halves, which get the
same guided output, and keeps the first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffkern.models.glide.diffusion import create_gaussian_diffusion, guided_model_fn
from diffkern.models.glide.model_creation import (
    create_model,
    model_and_diffusion_defaults,
    model_and_diffusion_defaults_upsampler,
)
from diffkern.models.glide.tokenizer import load_glide_tokenizer
from diffkern.models.weights import CheckpointError, key_problems, read_state_dict
from diffkern.pipelines._common import ImagePipelineOutput, postprocess
from diffkern.schedulers._base import randn_like_diffusers

OUTPUT_TYPES = ("pil", "np", "pt")


class GlidePipeline:
    """GLIDE's base model (+ optional upsampler, tokenizer, noised CLIP) with OpenAI's options.

    base_options / upsampler_options are OpenAI's option dicts (model_and_diffusion_defaults() ...):
    image_size, text_ctx, diffusion_steps, noise_schedule, inpaint are read from them.
    tokenizer: a GlideTokenizer (GPT-2 BPE), a folder with its files, or None (then pass tokens).
    clip_model: a NoisedCLIP (with its ClipTokenizer) for use_clip_guidance.
    """

    def __init__(self, base_model, base_options, upsampler_model=None, upsampler_options=None, tokenizer=None,
                 clip_model=None):
        if upsampler_model is not None and upsampler_options is None:
            raise ValueError("upsampler_options: required with an upsampler_model")
        self.base_model, self.upsampler_model, self.clip_model = base_model, upsampler_model, clip_model
        self.base_options = {**model_and_diffusion_defaults(), **base_options}
        self.upsampler_options = None if upsampler_options is None else \
            {**model_and_diffusion_defaults_upsampler(), **upsampler_options}
        self.tokenizer = tokenizer if tokenizer is None or hasattr(tokenizer, "encode") else \
            load_glide_tokenizer(tokenizer)

    @classmethod
    def from_checkpoints(cls, base_path, upsampler_path=None, *, tokenizer=None, inpaint=False,
                         base_options=None, upsampler_options=None, clip_image_path=None, clip_text_path=None,
                         clip_tokenizer=None, device="cpu", use_fp16=False):
        """Load OpenAI's .pt files (base.pt / base_inpaint.pt, upsample.pt / upsample_inpaint.pt,
        optionally clip_image_enc.pt + clip_text_enc.pt) with torch.load(weights_only=True).

        The options default to OpenAI's released ones (inpaint / use_fp16 applied to both models);
        base_options / upsampler_options override them (e.g. for fine-tuned checkpoints). Raises
        FileNotFoundError for a missing file and CheckpointError naming the file for a corrupt one or
        one whose keys do not fit (missing / unexpected / mis-shaped keys listed).
        """
        base_opts = {**model_and_diffusion_defaults(), "inpaint": inpaint, "use_fp16": use_fp16,
                     **(base_options or {})}
        base = _load_model(base_path, base_opts, device)
        up, up_opts = None, None
        if upsampler_path is not None:
            up_opts = {**model_and_diffusion_defaults_upsampler(), "inpaint": inpaint, "use_fp16": use_fp16,
                       **(upsampler_options or {})}
            up = _load_model(upsampler_path, up_opts, device)
        clip = None
        if (clip_image_path is None) != (clip_text_path is None):
            raise ValueError("clip_image_path and clip_text_path: give both or neither")
        if clip_image_path is not None:
            from diffkern.models.glide.clip import create_clip_model
            from diffkern.models.glide.tokenizer import ClipTokenizer

            tok = clip_tokenizer
            if isinstance(tok, (str, Path)):
                tok = ClipTokenizer.from_path(tok)
            clip = create_clip_model(tokenizer=tok)
            _fill(clip.image_encoder, clip_image_path, "clip image encoder")
            _fill(clip.text_encoder, clip_text_path, "clip text encoder")
            clip = clip.to(device).eval()
        return cls(base, base_opts, up, up_opts, tokenizer=tokenizer, clip_model=clip)

    # -- public calls ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, *, tokens=None, guidance_scale=3.0, batch_size=1, base_respacing="100",
                 upsample_respacing="fast27", upsample_temp=0.997, generator=None, use_clip_guidance=False,
                 clip_guidance_scale=3.0, output_type="pil", progress=True):
        """Generate batch_size images of one prompt (a str, or `tokens`: its token ids, unpadded).

        guidance_scale None or use_clip_guidance: no classifier-free guidance. output_type "pil",
        "np" ((B, H, W, 3) in [0, 1]) or "pt" ((B, 3, H, W) in [0, 1]). Without an upsampler the
        base samples are returned.
        """
        self._check_common(batch_size, output_type)
        if self.base_options["inpaint"]:
            raise ValueError("this pipeline's base model is an inpainting model: call "
                             ".inpaint(image, mask, ...)")
        base = self._base(prompt, tokens, guidance_scale, batch_size, base_respacing, generator, progress,
                          use_clip_guidance, clip_guidance_scale, None)
        out = base
        if self.upsampler_model is not None:
            out = self._upsample(prompt, tokens, base, upsample_respacing, upsample_temp, generator, progress,
                                 None)
        return ImagePipelineOutput(images=postprocess(out, output_type))

    @torch.no_grad()
    def inpaint(self, image, mask, prompt=None, *, tokens=None, guidance_scale=5.0, batch_size=1,
                base_respacing="100", upsample_respacing="fast27", upsample_temp=0.997, generator=None,
                output_type="pil", progress=True):
        """Fill the region where `mask` is 0 (1 = keep) with the inpainting models.

        image: a PIL image, or a tensor (3, H, W) / (1, 3, H, W) in [-1, 1]; resized (bicubic) to
        each stage's size. mask: a tensor / array (H, W), (1, H, W) or (1, 1, H, W) of 0 / 1,
        resized nearest to 64 x 64 and from there to the upsampler's size (as the notebook).
        """
        self._check_common(batch_size, output_type)
        if not self.base_options["inpaint"] or (self.upsampler_model is not None
                                                and not self.upsampler_options["inpaint"]):
            raise ValueError("inpaint needs inpainting models (inpaint=True options, base_inpaint.pt / "
                             "upsample_inpaint.pt)")
        size = self.base_options["image_size"]
        mask_lo = _mask(mask, size)
        known_lo = _image(image, size) * mask_lo
        base = self._base(prompt, tokens, guidance_scale, batch_size, base_respacing, generator, progress,
                          False, None, (known_lo, mask_lo))
        out = base
        if self.upsampler_model is not None:
            up_size = self.upsampler_options["image_size"]
            mask_hi = F.interpolate(mask_lo, (up_size, up_size), mode="nearest")
            known_hi = _image(image, up_size) * mask_hi
            out = self._upsample(prompt, tokens, base, upsample_respacing, upsample_temp, generator, progress,
                                 (known_hi, mask_hi))
        return ImagePipelineOutput(images=postprocess(out, output_type))

    # -- stages ------------------------------------------------------------------------------------
    def _base(self, prompt, tokens, guidance_scale, B, respacing, generator, progress, use_clip, clip_scale,
              inpaint):
        o, model = self.base_options, self.base_model
        device = _device(model)
        diffusion = create_gaussian_diffusion(o["diffusion_steps"], o["noise_schedule"], respacing)
        cond_t, cond_m = self._tokens(prompt, tokens, o["text_ctx"], model, device)
        guided = guidance_scale is not None and not use_clip
        kwargs = {"tokens": cond_t.expand(B, -1), "mask": cond_m.expand(B, -1)}
        if guided:
            un_t, un_m = self._tokens(None, [], o["text_ctx"], model, device)
            kwargs = {"tokens": torch.cat([cond_t.expand(B, -1), un_t.expand(B, -1)]),
                      "mask": torch.cat([cond_m.expand(B, -1), un_m.expand(B, -1)])}
        denoised_fn = None
        if inpaint is not None:
            known, keep = (t.to(device).expand(B, -1, -1, -1) for t in inpaint)
            rows = 2 * B if guided else B
            kwargs.update(inpaint_image=known[:1].expand(rows, -1, -1, -1),
                          inpaint_mask=keep[:1].expand(rows, -1, -1, -1))
            denoised_fn = _keep_known(known, keep)
        cond_fn = None
        if use_clip:
            if self.clip_model is None:
                raise ValueError("use_clip_guidance: the pipeline has no clip_model")
            if not isinstance(prompt, str):
                raise ValueError("use_clip_guidance: needs the prompt text (CLIP has its own tokenizer)")
            cond_fn = self.clip_model.cond_fn([prompt] * B, clip_scale)
        model_fn = guided_model_fn(model, kwargs) if guided else (lambda x, t: model(x, t, **kwargs))
        size = o["image_size"]
        return diffusion.p_sample_loop(model_fn, (B, 3, size, size),
                                       guidance_scale=guidance_scale if guided else None,
                                       denoised_fn=denoised_fn, cond_fn=cond_fn, generator=generator,
                                       device=device, progress=progress)

    def _upsample(self, prompt, tokens, base, respacing, temp, generator, progress, inpaint):
        o, model = self.upsampler_options, self.upsampler_model
        device = _device(model)
        B, size = base.shape[0], o["image_size"]
        diffusion = create_gaussian_diffusion(o["diffusion_steps"], o["noise_schedule"], respacing)
        t, m = self._tokens(prompt, tokens, o["text_ctx"], model, device)
        # the notebook hands the upsampler the base samples as 8-bit images would store them
        low_res = ((base + 1) * 127.5).round() / 127.5 - 1
        kwargs = {"tokens": t.expand(B, -1), "mask": m.expand(B, -1), "low_res": low_res.to(device)}
        noise = randn_like_diffusers((B, 3, size, size), generator, device, torch.float32) * temp
        fn = lambda x, ts: model(x, ts, **kwargs)  # noqa: E731
        if inpaint is None:
            return diffusion.ddim_sample_loop(fn, noise.shape, noise=noise, device=device, progress=progress)
        known, keep = (x.to(device).expand(B, -1, -1, -1) for x in inpaint)
        kwargs.update(inpaint_image=known, inpaint_mask=keep)
        return diffusion.p_sample_loop(fn, noise.shape, noise=noise, denoised_fn=_keep_known(known, keep),
                                       generator=generator, device=device, progress=progress)

    # -- helpers -----------------------------------------------------------------------------------
    def _tokens(self, prompt, tokens, text_ctx, model, device):
        """(1, text_ctx) tokens and mask of a prompt or of unpadded token ids (GLIDE's padding)."""
        if (prompt is None) == (tokens is None):
            raise ValueError("give prompt (a str) or tokens (a list of token ids), exactly one")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
            if self.tokenizer is None:
                raise ValueError("prompt: the pipeline has no tokenizer; pass tokenizer= (a folder with "
                                 "GLIDE's encoder.json / vocab.bpe) or give token ids with tokens=")
            tokens = self.tokenizer.encode(prompt)
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.flatten().tolist()
        tokens = [int(t) for t in tokens][:text_ctx]
        n_vocab = model.token_embedding.num_embeddings
        if any(not 0 <= t < n_vocab for t in tokens):
            raise ValueError(f"tokens: ids must lie in [0, {n_vocab}), got {tokens}")
        pad = text_ctx - len(tokens)
        # GLIDE pads with the end token, the last id of its vocabulary, masked out
        ids = torch.tensor([tokens + [n_vocab - 1] * pad], device=device)
        mask = torch.tensor([[True] * len(tokens) + [False] * pad], device=device)
        return ids, mask

    @staticmethod
    def _check_common(batch_size, output_type):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, got {output_type!r}")


def _device(model):
    return next(model.parameters()).device


def _keep_known(known, keep):
    """The notebook's denoised_fn: x0 outside the mask, the known image inside it."""
    return lambda x0: x0 * (1 - keep) + known * keep


def _image(image, size):
    """(1, 3, size, size) float32 in [-1, 1] from a PIL image or a tensor in [-1, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        resized = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
        array = np.asarray(resized, dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or image.shape[-3] != 3 or \
            (image.dim() == 4 and image.shape[0] != 1):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a PIL image or a (3, H, W) / (1, 3, H, W) tensor in [-1, 1], "
                         f"got {got}")
    image = image.float().reshape(1, 3, *image.shape[-2:])
    if tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image, (size, size), mode="bicubic", align_corners=False)
    return image


def _mask(mask, size):
    """(1, 1, size, size) float32 of 0 / 1 (nearest resize)."""
    mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    if mask.dim() not in (2, 3, 4) or mask.numel() != mask.shape[-1] * mask.shape[-2]:
        raise ValueError(f"mask: expected (H, W), (1, H, W) or (1, 1, H, W), got {tuple(mask.shape)}")
    mask = mask.reshape(1, 1, *mask.shape[-2:])
    if tuple(mask.shape[-2:]) != (size, size):
        mask = F.interpolate(mask, (size, size), mode="nearest")
    return mask


def _fill(module, path, what):
    """load_state_dict from a checkpoint file, every problem a CheckpointError naming the file."""
    sd = read_state_dict(path)
    problems = key_problems(module, sd, what)
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit the {what}:\n  " + "\n  ".join(problems))
    module.load_state_dict(sd)


def _load_model(path, options, device):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLIDE checkpoint not found: {path}")
    model = create_model(**options)
    what = "upsampler" if options.get("super_res") else "base model"
    _fill(model, path, f"GLIDE {what} ({'inpaint, ' if options.get('inpaint') else ''}"
                       f"image_size {options['image_size']})")
    return model.to(device).eval()
