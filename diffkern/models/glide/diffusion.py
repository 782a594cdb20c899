"""GLIDE's Gaussian diffusion: noise schedules, respacing and the three samplers, on diffkern.schedulers.

    diffusion = create_gaussian_diffusion(1000, "squaredcos_cap_v2", "100")
    x0 = diffusion.p_sample_loop(guided_model_fn(model, kwargs), (1, 3, 64, 64), guidance_scale=3.0)

Facts from OpenAI's glide_text2im (gaussian_diffusion.py, respace.py), equations of improved DDPM
(Nichol & Dhariwal 2021):

- schedules: "linear" is Ho et al.'s 1e-4 .. 0.02 scaled by 1000 / steps; "squaredcos_cap_v2" is the
  cosine alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2 with betas capped at 0.999. float64.
- respacing keeps a subset of timesteps and rebuilds betas 1 - abar_i / abar_prev over it; the sampler
  runs in index space 0..K-1 and the model sees the kept (original) timestep of each index.
- learned sigma: the model outputs 2C channels, eps then v in [-1, 1]; log variance =
  f log(beta_i) + (1 - f) posterior_log_variance_clipped_i with f = (v + 1) / 2.
- classifier-free guidance combines the eps channels only; the variance comes from the conditional half.
- clip_denoised clamps x0 to [-1, 1]; DDIM re-derives eps from the clamped x0.
- cond_fn (gradient of log p(y | x_t)): DDPM shifts the mean by variance * grad (Sohl-Dickstein et al.),
  DDIM shifts the score, eps' = eps - sqrt(1 - abar) grad (Song et al. 2020). With guidance_scale too,
  it shifts the guided step: the mean (or score) of the guided eps, the variance of the conditional half.

Each step is one call of the scheduler's fused guided_step; only denoised_fn (inpainting) and cond_fn
(CLIP guidance) need a few elementwise torch ops before it (see `_prepared_output`). The loops are the
house's one sampling loop, diffkern.schedulers.sampling.denoise_loop, over the diffusion indices;
`_GlideSteps` stands in for its scheduler and adds GLIDE's parts to each step.
"""

from __future__ import annotations

import math

import torch

from diffkern.schedulers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
from diffkern.schedulers._base import randn_like_diffusers
from diffkern.schedulers.sampling import denoise_loop
from diffkern.schedulers.schedules import respaced_betas, space_timesteps

NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """float64 betas of OpenAI's named schedules ("linear" or "squaredcos_cap_v2")."""
    T = num_diffusion_timesteps
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"num_diffusion_timesteps must be a positive int, got {T!r}")
    if schedule_name == "linear":
        scale = 1000 / T  # keeps the schedule's shape for any number of steps
        return torch.linspace(scale * 0.0001, scale * 0.02, T, dtype=torch.float64)
    if schedule_name == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                            dtype=torch.float64)
    raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {schedule_name!r}")


def create_gaussian_diffusion(steps=1000, noise_schedule="squaredcos_cap_v2", timestep_respacing=""):
    """GLIDE's diffusion for these options (OpenAI's names): `steps` training timesteps, the named
    schedule, and timestep_respacing "" (all steps), "100", "10,10,3,2,2", "ddim50" or "fast27"."""
    betas = get_named_beta_schedule(noise_schedule, steps)
    if not timestep_respacing:
        timestep_respacing = [steps]
    return GaussianDiffusion(betas, space_timesteps(steps, timestep_respacing))


def guided_model_fn(model, model_kwargs):
    """model_fn for classifier-free guidance as GLIDE batches it: `model_kwargs` hold 2B rows, the
    conditional ones first; each call runs the model ONCE on [x; x] and returns (cond, uncond)."""

    def model_fn(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), **model_kwargs)
        return out.chunk(2)

    return model_fn


class GaussianDiffusion:
    """A (respaced) GLIDE diffusion process: float64 schedule arrays in index space and its samplers.

    Attributes: betas, alphas_cumprod, alphas_cumprod_prev, posterior_variance,
    posterior_log_variance_clipped (float64, length num_timesteps), timestep_map (int64: the original
    timestep of each index, what the model is called with), original_num_steps.

    Sampler arguments shared by the loops:
        model_fn: (x, t) -> (B, 2C, H, W) eps + variance values, t the (B,) original timesteps; with
            guidance_scale it returns (cond, uncond), each (B, 2C, H, W) (see `guided_model_fn`).
        guidance_scale: None (no classifier-free guidance) or s: eps = uncond + s (cond - uncond).
        noise: x_T (default: drawn from `generator` as diffusers draws it).
        clip_denoised: clamp x0 to [-1, 1]. denoised_fn: x0 -> x0, applied before the clamp.
        cond_fn: (x, t) -> gradient of log p(y | x_t), t the original timesteps; composes with
            guidance_scale (it shifts the guided step).
        generator: torch.Generator (or one per sample) for x_T and every step's noise.
        progress: a tqdm bar. callback: callback(index, step_output) after each step.
    """

    def __init__(self, betas, use_timesteps=None):
        base = torch.as_tensor(betas, dtype=torch.float64)
        if base.dim() != 1 or not bool(((base > 0) & (base <= 1)).all()):
            raise ValueError("betas must be a 1-D sequence of values in (0, 1]")
        self.original_num_steps = len(base)
        kept = range(len(base)) if use_timesteps is None else use_timesteps
        if any(not 0 <= int(t) < len(base) for t in kept):
            raise ValueError(f"use_timesteps must lie in [0, {len(base)}), got {sorted(kept)}")
        betas, kept = respaced_betas(torch.cumprod(1 - base, 0), kept)
        self.timestep_map = torch.tensor(kept, dtype=torch.int64)
        self.betas = betas
        self.num_timesteps = K = len(betas)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # log of 0 at index 0: OpenAI uses index 1's value there (it only matters for cond_fn's shift)
        first = self.posterior_variance[1:2] if K > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))

    # -- schedulers in index space -------------------------------------------------------------------
    def _scheduler(self, cls, **config):
        s = cls(num_train_timesteps=self.num_timesteps, trained_betas=self.betas.tolist(), **config)
        # The schedulers keep float32 schedules (as diffusers); GLIDE computes in float64, and 1 - abar
        # near t = 0 loses ~1e-3 relative in float32. Their step coefficients read alphas_cumprod, so
        # hand them the float64 arrays (the coefficients are still rounded once to float32 at the end).
        s.betas, s.alphas, s.alphas_cumprod = self.betas, 1 - self.betas, self.alphas_cumprod
        s.set_timesteps(self.num_timesteps)
        return s

    def ddpm_scheduler(self, clip_denoised=True):
        """DDPMScheduler (learned_range variance) running every index K-1 .. 0."""
        return self._scheduler(DDPMScheduler, variance_type="learned_range", clip_sample=clip_denoised)

    def ddim_scheduler(self, clip_denoised=True):
        """DDIMScheduler stepping index i -> i - 1 (the last step to abar = 1, as OpenAI's)."""
        return self._scheduler(DDIMScheduler, clip_sample=clip_denoised, set_alpha_to_one=True)

    def ddim_inverse_scheduler(self, clip_denoised=False):
        """DDIMInverseScheduler stepping abar = 1 -> index 0 -> ... -> index K-1."""
        return self._scheduler(DDIMInverseScheduler, clip_sample=clip_denoised, set_alpha_to_one=True)

    # -- samplers ------------------------------------------------------------------------------------
    def p_sample_loop(self, model_fn, shape, *, guidance_scale=None, noise=None, clip_denoised=True,
                      denoised_fn=None, cond_fn=None, generator=None, device=None, dtype=torch.float32,
                      progress=False, callback=None):
        """Ancestral sampling with the learned variance (Ho et al. 2020; improved DDPM) -> x_0."""
        return self._loop("ddpm", model_fn, shape, guidance_scale, noise, clip_denoised, denoised_fn, cond_fn,
                          generator, device, dtype, progress, callback, 0.0)

    def ddim_sample_loop(self, model_fn, shape, *, eta=0.0, guidance_scale=None, noise=None,
                         clip_denoised=True, denoised_fn=None, cond_fn=None, generator=None, device=None,
                         dtype=torch.float32, progress=False, callback=None):
        """DDIM sampling (Song et al. 2021, eq. 12) with this eta -> x_0."""
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        return self._loop("ddim", model_fn, shape, guidance_scale, noise, clip_denoised, denoised_fn, cond_fn,
                          generator, device, dtype, progress, callback, float(eta))

    @torch.no_grad()
    def ddim_reverse_sample_loop(self, model_fn, x0, *, guidance_scale=None, clip_denoised=False,
                                 fixed_point_iterations=0, progress=False, callback=None):
        """DDIM inversion (the eta = 0 ODE run forward): x_0 -> x at the last index.

        As diffusers' DDIMInverseScheduler, the step into index i evaluates the model at timestep i
        on the current (less noisy) sample: a first-order approximation, so inverting then sampling
        returns x_0 up to O(1 / num_timesteps). fixed_point_iterations = n re-evaluates the model n
        more times at the new sample and redoes the step: the fixed point is the exact inverse of
        ddim_sample_loop's step (the same eps at the same (x, t)), so the round trip becomes exact
        when the iteration converges (it contracts for smooth models while the step is small; the
        cosine schedule's last step, to abar ~ 0 with beta capped at 0.999, is too large for it and
        keeps an O(1e-2) error there). clip_denoised defaults to False: clamping x0 is not invertible.
        """
        if isinstance(fixed_point_iterations, bool) or not isinstance(fixed_point_iterations, int) \
                or fixed_point_iterations < 0:
            raise ValueError(f"fixed_point_iterations must be an int >= 0, got {fixed_point_iterations!r}")
        steps = _GlideSteps(self, self.ddim_inverse_scheduler(clip_denoised), {},
                            list(range(self.num_timesteps)), model_fn=model_fn,
                            guidance_scale=guidance_scale, fixed_point_iterations=fixed_point_iterations)
        return denoise_loop(steps.model_fn, steps, x0, steps.timesteps,
                            guidance_scale=guidance_scale, progress=progress,
                            callback=_index_callback(callback))

    # -- internals -----------------------------------------------------------------------------------
    def _call(self, model_fn, x, i, guidance_scale):
        t = self.timestep_map[i].to(x.device).expand(x.shape[0])
        out = model_fn(x, t)
        if guidance_scale is None:
            if not isinstance(out, torch.Tensor):
                raise TypeError("model_fn must return a tensor without guidance_scale (a pair with it)")
            return out.to(x.dtype), None
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("with guidance_scale, model_fn must return (cond_output, uncond_output)")
        return out[0].to(x.dtype), out[1].to(x.dtype)

    def _coef(self, name, i, x):
        return getattr(self, name)[i].to(device=x.device, dtype=x.dtype)

    @torch.no_grad()
    def _loop(self, kind, model_fn, shape, guidance_scale, noise, clip_denoised, denoised_fn, cond_fn,
              generator, device, dtype, progress, callback, eta):
        if noise is not None:
            x = noise.to(device=device or noise.device, dtype=dtype)
            if tuple(x.shape) != tuple(shape):
                raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(x.shape)}")
        else:
            x = randn_like_diffusers(tuple(shape), generator, device, dtype)
        if kind == "ddpm":
            sched, kw, unclamped = self.ddpm_scheduler(clip_denoised), {}, None
        else:
            sched = self.ddim_scheduler(clip_denoised)
            kw = {"eta": eta, "use_clipped_model_output": True}  # OpenAI re-derives eps from the clamped x0
            # after condition_score OpenAI does not clamp again: that step runs unclamped
            unclamped = self.ddim_scheduler(False) if cond_fn is not None else None
        steps = _GlideSteps(self, sched, kw, list(range(self.num_timesteps - 1, -1, -1)), model_fn=model_fn,
                            guidance_scale=guidance_scale, kind=kind, clip_denoised=clip_denoised,
                            denoised_fn=denoised_fn, cond_fn=cond_fn, unclamped=unclamped)
        return denoise_loop(steps.model_fn, steps, x, steps.timesteps,
                            guidance_scale=guidance_scale, generator=generator, progress=progress,
                            callback=_index_callback(callback))

    def _prepared_output(self, sched, kind, x, i, cond, uncond, guidance_scale, clip_denoised, denoised_fn,
                         grad):
        """The 2C-channel model output whose plain step equals OpenAI's step with denoised_fn and / or
        DDIM's condition_score: the guidance combine, x0 -> denoised_fn -> clamp, then eps re-derived
        from that x0 (minus sqrt(1 - abar) grad for DDIM). The scheduler recomputes the same x0 from it."""
        C = x.shape[1]
        eps = cond[:, :C]
        if uncond is not None:
            eps = uncond[:, :C] + guidance_scale * (eps - uncond[:, :C])
        # the step's own (float32-rounded) sqrt(abar), sqrt(1 - abar): x0 -> eps -> x0 must round-trip
        # exactly, and at the noisiest steps 1 / sqrt(abar) ~ 1e4 would amplify any mismatch
        sa, s1m = (c.item() for c in sched.step_coefficients(i)[0, :2])
        x0 = (x - s1m * eps) / sa
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        eps = (x - sa * x0) / s1m
        if kind == "ddim" and grad is not None:
            eps = eps - s1m * grad
        return torch.cat([eps, cond[:, C:]], dim=1)

    def _model_variance(self, i, v):
        """exp of the learned log variance at index i from the variance values v in [-1, 1]."""
        frac = (v + 1) / 2
        max_log = self._coef("betas", i, v).log()
        min_log = self._coef("posterior_log_variance_clipped", i, v)
        return torch.exp(frac * max_log + (1 - frac) * min_log)


def _index_callback(callback):
    """denoise_loop calls back (counter, index, output); GLIDE's callbacks take (index, output)."""
    return None if callback is None else (lambda _, i, out: callback(i, out))


class _GlideSteps:
    """The scheduler denoise_loop drives for GLIDE: the model is called at the original timestep of
    each index (`model_fn`), and `step` adds what OpenAI's samplers do beside the plain update: the
    channel check, cond_fn's gradient (DDPM: mean shift after the step; DDIM: score shift, unclamped),
    denoised_fn, and for DDIM inversion the fixed-point re-evaluations of the model."""

    def __init__(self, diffusion, sched, step_kw, timesteps, *, model_fn, guidance_scale, kind="ddim",
                 clip_denoised=False, denoised_fn=None, cond_fn=None, unclamped=None,
                 fixed_point_iterations=0):
        self.diffusion, self.sched, self.step_kw, self.kind = diffusion, sched, step_kw, kind
        self.timesteps = timesteps  # the diffusion indices, in the order the loop runs them
        self.user_model_fn, self.guidance_scale = model_fn, guidance_scale
        self.clip_denoised, self.denoised_fn = clip_denoised, denoised_fn
        self.cond_fn, self.unclamped = cond_fn, unclamped
        self.fixed_point_iterations = fixed_point_iterations

    def scale_model_input(self, x, i):
        return x  # DDPM / DDIM do not scale the model input

    def model_fn(self, x, i):
        cond, uncond = self.diffusion._call(self.user_model_fn, x, i, self.guidance_scale)
        return cond if self.guidance_scale is None else (cond, uncond)

    def step(self, model_output, i, x, generator=None, uncond_output=None, guidance_scale=None):
        if isinstance(self.sched, DDIMInverseScheduler):
            return self._inverse_step(model_output, i, x, uncond_output)
        d, C = self.diffusion, x.shape[1]
        cond, uncond = model_output, uncond_output
        if cond.shape[1] != 2 * C:
            raise ValueError(f"model_fn must return 2*C={2 * C} channels (eps, variance values), "
                             f"got {cond.shape[1]}")
        grad = None
        if self.cond_fn is not None:
            t = d.timestep_map[i].to(x.device).expand(x.shape[0])
            with torch.enable_grad():
                grad = self.cond_fn(x, t).to(x.dtype)
        step_sched, step_kw = self.sched, dict(self.step_kw)
        if self.denoised_fn is None and (grad is None or self.kind == "ddpm"):
            model_out = cond
            scale = 1.0 if guidance_scale is None else guidance_scale
            step_kw.update(uncond_output=uncond, guidance_scale=scale)
        else:
            model_out = d._prepared_output(self.sched, self.kind, x, i, cond, uncond, guidance_scale,
                                           self.clip_denoised, self.denoised_fn, grad)
            if self.kind == "ddim" and grad is not None:
                step_sched = self.unclamped
        out = step_sched.step(model_out, i, x, generator=generator, **step_kw)
        if self.kind == "ddpm" and grad is not None:  # condition_mean
            shifted = out.prev_sample + d._model_variance(i, cond[:, C:]) * grad
            out = type(out)(prev_sample=shifted, pred_original_sample=out.pred_original_sample)
        return out

    def _inverse_step(self, cond, i, x, uncond):
        C, scale = x.shape[1], 1.0 if self.guidance_scale is None else self.guidance_scale
        # DDIMInverseScheduler takes C channels: the variance channels play no part in DDIM
        out = self.sched.step(cond[:, :C], i, x, uncond_output=None if uncond is None else uncond[:, :C],
                              guidance_scale=scale)
        for _ in range(self.fixed_point_iterations):
            cond, uncond = self.diffusion._call(self.user_model_fn, out.prev_sample, i, self.guidance_scale)
            out = self.sched.step(cond[:, :C], i, x, uncond_output=None if uncond is None else uncond[:, :C],
                                  guidance_scale=scale)
        return out
