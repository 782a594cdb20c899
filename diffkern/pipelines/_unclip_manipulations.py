"""The DALL-E 2 paper's image manipulations (Ramesh et al. 2022, sec. 3), on an unCLIP decoder.

The decoder inverts the bipartite latent (z_i, x_T): z_i = CLIP image embedding, x_T = the decoder's
DDIM inversion of the image conditioned on z_i (sec. 3.1). Then

  variations (3.1):      decode (z_i, x_T) with DDIM eta > 0; eta = 0 reconstructs the image.
  interpolations (3.2):  z_theta = slerp(z_1, z_2, theta) of the unit embeddings, rescaled to
                         (1 - theta) |z_1| + theta |z_2|; x_T fixed (x_T of the first image) or slerped too.
  text diffs (3.3):      z_d = normalize(z_t(target) - z_t(current caption)); z_theta = slerp(z_i, z_d, theta)
                         rescaled to |z_i|, decoded from the image's inverted x_T with eta = 0.

slerp(a, b, theta) = sin((1 - theta) w) / sin(w) a + sin(theta w) / sin(w) b, cos(w) = a . b (a, b unit).
Karlo's and diffusers' variations instead start from white noise (UnCLIPImageVariationPipeline), and the
diffusers community interpolation slerps element-wise; these follow the paper.

DDIM (Song et al. 2021, eq. 12) on the decoder's own cosine schedule, leading spacing (t = 999, whose beta
is capped at 0.999, is never visited, so the inversion converges):
  x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);  x_s = sqrt(a_s) x0 + sqrt(1 - a_s - sigma^2) eps + sigma z,
  sigma = eta sqrt((1 - a_s) / (1 - a_t)) sqrt(1 - a_t / a_s).
Inversion runs the eta = 0 step backwards, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with eps evaluated at
the unknown x_t by fixed-point iterations, so that sampling it back is exact up to those iterations.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from diffkern.pipelines._common import ImagePipelineOutput
from diffkern.pipelines import _unclip_stages as stages
from diffkern.schedulers import DDIMScheduler


def check_theta(theta, name="theta"):
    """theta as a float in [0, 1], else ValueError naming the argument."""
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not 0.0 <= float(theta) <= 1.0:
        raise ValueError(f"{name}: must be a number in [0, 1], got {theta!r}")
    return float(theta)


def slerp(a, b, theta, eps=1e-7):
    """Spherical interpolation between the directions of a and b (..., D), unit-norm result.

    Falls back to the normalised linear interpolation when a and b are (anti)parallel within eps."""
    theta = check_theta(theta)
    ua, ub = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    safe = so.abs() > eps
    wa = torch.where(safe, torch.sin((1 - theta) * omega) / torch.where(safe, so, 1.0), 1.0 - theta)
    wb = torch.where(safe, torch.sin(theta * omega) / torch.where(safe, so, 1.0), theta)
    out = wa * ua + wb * ub
    return out / out.norm(dim=-1, keepdim=True)


def interpolate_embeddings(z1, z2, theta):
    """slerp of the unit CLIP embeddings rescaled to (1 - theta) |z1| + theta |z2| (the inputs' norms at
    the ends)."""
    theta = check_theta(theta)
    norm = (1 - theta) * z1.norm(dim=-1, keepdim=True) + theta * z2.norm(dim=-1, keepdim=True)
    return slerp(z1, z2, theta) * norm


def text_diff_embedding(z_image, z_text_current, z_text_target, theta):
    """z_theta = slerp(z_i, normalize(z_t(target) - z_t(current)), theta), rescaled to |z_i|."""
    theta = check_theta(theta)
    diff = z_text_target - z_text_current
    return slerp(z_image, diff, theta) * z_image.norm(dim=-1, keepdim=True)


class UnCLIPManipulations:
    """Variations, interpolations and text diffs of an UnCLIPImageVariationPipeline's components.

    UnCLIPManipulations(variation_pipeline, num_inference_steps=50, guidance_scale=8.0,
    fixed_point_iterations=3). Every method decodes with DDIM on the decoder (CFG fused into each
    step) and then runs the pipeline's super-resolution stage (output_type="pt" | "np" | "pil"), or
    returns the 64x64 decoder images with super_res=False.
    """

    def __init__(self, pipe, num_inference_steps=50, guidance_scale=8.0, fixed_point_iterations=3):
        self.pipe = pipe
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected an int >= 1, got {num_inference_steps!r}")
        self.steps, self.guidance_scale, self.iterations = num_inference_steps, guidance_scale, fixed_point_iterations
        self.ddim = DDIMScheduler(num_train_timesteps=len(pipe.decoder_scheduler.alphas_cumprod),
                                  beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True,
                                  prediction_type="epsilon", timestep_spacing="leading")

    # -- the bipartite latent -------------------------------------------------------------------
    def image_embeddings(self, image):
        """z_i: CLIP image embeddings (B, D) of PIL images or CLIP pixel values."""
        return self.pipe.encode_image(image)

    def decoder_image(self, image):
        """PIL image(s) or a (B, 3, S, S) tensor in [-1, 1] -> the decoder-size tensor in [-1, 1]."""
        from PIL import Image

        size = self.pipe.decoder.config.sample_size
        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, list):
            arrays = [np.asarray(i.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
                      for i in image]
            image = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or tuple(image.shape[1:]) != (3, size, size):
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image: expected PIL image(s) or a (B, 3, {size}, {size}) tensor in [-1, 1], got {got}")
        return image.to(self.pipe.device, next(self.pipe.decoder.parameters()).dtype)

    def _model_fn(self, z):
        p = self.pipe
        guided = self.guidance_scale > 1.0
        embeds, hidden, mask = stages.encode_prompt(p.text_encoder, p.tokenizer, [""] * z.shape[0], p.device, 1,
                                                    guided, warn_truncation=False)
        context, time_emb, ctx_mask = stages.decoder_conditioning(p.text_proj, z, embeds, hidden, mask, guided)
        return stages.decoder_model_fn(p.decoder, context, time_emb, ctx_mask, guided)

    def _eps(self, fn, x, t):
        cond, uncond = fn(x, t)
        C = x.shape[1]
        eps = cond[:, :C]
        return eps if uncond is None else uncond[:, :C] + self.guidance_scale * (eps - uncond[:, :C])

    def _abar(self, t):
        return float(self.ddim.final_alpha_cumprod) if t < 0 else float(self.ddim.alphas_cumprod[t])

    @torch.no_grad()
    def invert(self, image, image_embeddings):
        """x_T of the decoder's DDIM (eta = 0) for `image` (decoder size, [-1, 1]) given z_i (B, D)."""
        x = self.decoder_image(image)
        fn = self._model_fn(image_embeddings)
        self.ddim.set_timesteps(self.steps)
        ts = [int(t) for t in self.ddim.timesteps.flip(0)]  # ascending
        stride = self.ddim.config.num_train_timesteps // self.steps
        for t in ts:
            a_s, a_t = self._abar(t - stride), self._abar(t)
            eps = self._eps(fn, x, t - stride if t - stride >= 0 else t)
            x0_coef, eps_coef = (a_t / a_s) ** 0.5, (1 - a_t) ** 0.5 - (a_t * (1 - a_s) / a_s) ** 0.5
            x_t = x0_coef * x + eps_coef * eps
            for _ in range(self.iterations):  # eps at the unknown x_t: the exact inverse of the DDIM step
                x_t = x0_coef * x + eps_coef * self._eps(fn, x_t, t)
            x = x_t
        return x

    @torch.no_grad()
    def decode(self, image_embeddings, x_T, eta=0.0, generator=None):
        """DDIM from x_T conditioned on z (B, D) -> decoder images (B, 3, S, S) in [-1, 1] (clamped)."""
        if not isinstance(eta, numbers.Real) or eta < 0:
            raise ValueError(f"eta: must be a number >= 0, got {eta!r}")
        fn = self._model_fn(image_embeddings)
        self.ddim.set_timesteps(self.steps)
        x = x_T
        for t in self.ddim.timesteps:
            cond, uncond = fn(x, t)
            x = self.ddim.step(cond, t, x, eta=eta, generator=generator, uncond_output=uncond,
                               guidance_scale=self.guidance_scale).prev_sample
        return x.clamp(-1, 1)

    def _finish(self, image_small, super_res, generator, output_type, super_res_num_inference_steps):
        p = self.pipe
        if super_res:
            image_small = stages.run_super_res(p.super_res_first, p.super_res_last, p.super_res_scheduler,
                                               image_small, steps=super_res_num_inference_steps,
                                               generator=generator, latents=None)
        return ImagePipelineOutput(images=stages.to_output(image_small, output_type))

    # -- the three manipulations ----------------------------------------------------------------
    @torch.no_grad()
    def variations(self, image, num_variations=4, eta=1.0, generator=None, super_res=True, output_type="pil",
                   super_res_num_inference_steps=7):
        """`num_variations` decodings per image of its (z_i, x_T) with DDIM eta (> 0 varies details)."""
        x = self.decoder_image(image)
        z = self.image_embeddings(self._clip_input(image, x))
        x_T = self.invert(x, z)
        z, x_T = z.repeat_interleave(num_variations, 0), x_T.repeat_interleave(num_variations, 0)
        small = self.decode(z, x_T, eta=eta, generator=generator)
        return self._finish(small, super_res, generator, output_type, super_res_num_inference_steps)

    @torch.no_grad()
    def interpolate(self, image_a, image_b, thetas=None, steps_between=3, slerp_noise=False, generator=None,
                    super_res=True, output_type="pil", super_res_num_inference_steps=7):
        """Images along z_theta = interpolate_embeddings(z_a, z_b, theta) for theta in `thetas` (default
        steps_between + 2 evenly spaced values in [0, 1]); x_T is image_a's (fixed) or slerp_noise=True:
        slerp(x_T(a), x_T(b), theta) rescaled to the interpolated norm, decoded with eta = 0."""
        if thetas is None:
            if not isinstance(steps_between, int) or steps_between < 0:
                raise ValueError(f"steps_between: expected an int >= 0, got {steps_between!r}")
            thetas = np.linspace(0.0, 1.0, steps_between + 2).tolist()
        thetas = [check_theta(t, "thetas") for t in thetas]
        xa, xb = self.decoder_image(image_a), self.decoder_image(image_b)
        if xa.shape[0] != 1 or xb.shape[0] != 1:
            raise ValueError("image_a, image_b: one image each")
        za = self.image_embeddings(self._clip_input(image_a, xa))
        zb = self.image_embeddings(self._clip_input(image_b, xb))
        xta = self.invert(xa, za)
        xtb = self.invert(xb, zb) if slerp_noise else None
        zs = torch.cat([interpolate_embeddings(za, zb, t) for t in thetas])
        if slerp_noise:
            flat = [interpolate_embeddings(xta.flatten(1), xtb.flatten(1), t) for t in thetas]
            x_T = torch.cat(flat).reshape(len(thetas), *xta.shape[1:])
        else:
            x_T = xta.expand(len(thetas), *xta.shape[1:])
        small = self.decode(zs, x_T, eta=0.0, generator=generator)
        return self._finish(small, super_res, generator, output_type, super_res_num_inference_steps)

    @torch.no_grad()
    def text_diff(self, image, current_caption, target_caption, thetas=(0.0, 0.25, 0.5), generator=None,
                  super_res=True, output_type="pil", super_res_num_inference_steps=7):
        """Images of text_diff_embedding(z_i, z_t(current), z_t(target), theta) from the image's x_T."""
        thetas = [check_theta(t, "thetas") for t in thetas]
        for name, c in (("current_caption", current_caption), ("target_caption", target_caption)):
            if not isinstance(c, str):
                raise ValueError(f"{name}: expected a str, got {type(c).__name__}")
        x = self.decoder_image(image)
        if x.shape[0] != 1:
            raise ValueError("image: one image")
        z = self.image_embeddings(self._clip_input(image, x))
        x_T = self.invert(x, z)
        zc, zt = self.text_embeddings([current_caption, target_caption]).chunk(2)
        zs = torch.cat([text_diff_embedding(z, zc, zt, t) for t in thetas])
        small = self.decode(zs, x_T.expand(len(thetas), *x_T.shape[1:]), eta=0.0, generator=generator)
        return self._finish(small, super_res, generator, output_type, super_res_num_inference_steps)

    def text_embeddings(self, captions):
        """z_t: the CLIP text embeddings (text_embeds) of `captions`."""
        p = self.pipe
        ids = p.tokenizer(captions, padding="max_length", max_length=p.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
        return p.text_encoder(ids.to(p.device)).text_embeds

    def _clip_input(self, image, decoder_image):
        """What CLIP embeds: the PIL images as given, or (for tensors) the decoder-size image mapped to
        [0, 1] and resized to CLIP's input with the feature extractor's normalisation."""
        if not isinstance(image, torch.Tensor):
            return image
        fe = self.pipe.feature_extractor
        arrays = ((decoder_image.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        return fe(images=list(arrays), return_tensors="pt", do_rescale=False).pixel_values
