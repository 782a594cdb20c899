"""guided_step benchmark: one sampling step with classifier-free guidance and Imagen dynamic
thresholding, against the eager chain written the way diffusers does it (CFG combine, then
DDPMScheduler.step: x0 from eps, torch.quantile thresholding, posterior mean, + std * noise).

Bytes counted: sample, cond, uncond and noise read once; prev_sample and pred_original_sample
written once (the thresholding statistics pass is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffkern import ops
from diffkern.bench import harness

OP = "guided_step"
GUIDANCE = 7.0
PERCENTILE = 0.995
MAX_VALUE = 1.5
SHAPES = [("if-stage1", (4, 3, 64, 64)), ("if-stage2", (4, 3, 256, 256)), ("if-stage3", (1, 3, 1024, 1024)),
          ("sd-latent", (2, 4, 64, 64))]
TARGET_SHAPE = (4, 3, 256, 256)
CPU_TARGET = 5.0


@dataclass
class Case:
    name: str
    shape: tuple
    dtype: torch.dtype


def cases(device, quick=False):
    dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    shapes = [s for s in SHAPES if s[1] == TARGET_SHAPE] if quick else SHAPES
    return [Case(name, shape, dt) for dt in dtypes for name, shape in shapes]


def _coefficients(B, device):
    """DDPM posterior at t = 500 of the linear 1000-step schedule, as [sa, s1m, c_x0, c_xt, 0, std]."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    t = 500
    a_t, a_prev, beta = ac[t], ac[t - 1], betas[t]
    var = (1 - a_prev) / (1 - a_t) * beta
    row = torch.tensor([a_t.sqrt(), (1 - a_t).sqrt(), a_prev.sqrt() * beta / (1 - a_t),
                        (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t), 0.0, var.sqrt()])
    return row.to(torch.float32).repeat(B, 1).to(device)


def diffusers_style_step(x, cond, uncond, noise, coeffs):
    """CFG combine + diffusers' DDPM step with thresholding, op by op in eager PyTorch."""
    sa, s1m, c_x0, c_xt, _, std = (coeffs[:, i].view(-1, *([1] * (x.dim() - 1))) for i in range(6))
    eps = uncond + GUIDANCE * (cond - uncond)
    x0 = (x - s1m * eps) / sa
    flat = x0.reshape(x.shape[0], -1).float()
    s = torch.quantile(flat.abs(), PERCENTILE, dim=1).clamp(min=1, max=MAX_VALUE).unsqueeze(1)
    x0 = (torch.clamp(flat, -s, s) / s).reshape(x.shape).to(x.dtype)
    prev = c_x0 * x0 + c_xt * x
    return prev + std * noise, x0


def candidates(case, device, compile_reference=True):
    g = torch.Generator(device=device).manual_seed(0)
    x, cond, uncond, noise = (torch.randn(case.shape, device=device, dtype=case.dtype, generator=g) for _ in range(4))
    coeffs = _coefficients(case.shape[0], device)
    args = (x, cond, uncond, noise, coeffs)
    out = [("reference", lambda: diffusers_style_step(*args), "eager chain, diffusers' way")]
    if compile_reference:
        out.append(harness.compile_candidate(diffusers_style_step, *args))
    kw = dict(uncond_output=uncond, guidance_scale=GUIDANCE, clip="dynamic", dynamic_percentile=PERCENTILE,
              dynamic_max_value=MAX_VALUE, noise=noise)
    would_run = lambda n: ops.guided_step_backend(x, cond, coeffs, backend=n, **kw)  # noqa: E731
    for name in harness.kernel_backends(OP, device, would_run):
        out.append((name, lambda n=name: ops.guided_step(x, cond, coeffs, backend=n, **kw), ""))
        # the same step drawing its noise in the kernel (the others are handed a pre-drawn noise tensor)
        seeded = dict(kw, noise=None, noise_seed=1234)
        out.append((f"{name}+seed", lambda n=name: ops.guided_step(x, cond, coeffs, backend=n, **seeded),
                    "Philox noise drawn in the kernel, no noise tensor read"))
    return out, x.numel() * x.element_size() * 6


def run(device, quick=False, compile_reference=True, log=print):
    return harness.run_cases(OP, cases(device, quick), lambda c: candidates(c, device, compile_reference), device,
                             lambda c: (f"{c.name} {tuple(c.shape)}", str(c.dtype)[6:], "dynamic-threshold"), log)


def targets(rows, device, copy_gbps):
    """The CPU target of issue 4 ([(text, passed)]); the GPU ones need a GPU run."""
    out = []
    for r in rows:
        if device.type == "cpu" and r.backend == "cpu" and tuple(r.shape) == TARGET_SHAPE:
            out.append(harness.target(f"cpu {r.case} fp32 vs the eager chain", r.speedup_vs_reference, CPU_TARGET,
                                      r, "{:.1f}x"))
    return out
