"""dynamic_threshold benchmark: Imagen / DeepFloyd-IF-sized pixel samples and SD latents, against
diffusers' way (torch.quantile in float32 on |x| flattened per sample, clamp, divide).

Bytes counted: x read once and y written once (the selection passes re-read x; they are not
counted, so GB/s is the op's effective bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffkern import ops
from diffkern.bench import harness

OP = "dynamic_threshold"
PERCENTILE = 0.995
MAX_VALUE = 1.5
SHAPES = [(4, 3, 64, 64), (4, 3, 256, 256), (1, 3, 1024, 1024), (2, 4, 64, 64)]
TARGET_SHAPE = (4, 3, 256, 256)
CPU_TARGET = 10.0


@dataclass
class Case:
    name: str
    shape: tuple
    dtype: torch.dtype


def cases(device, quick=False):
    dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    shapes = [TARGET_SHAPE] if quick else SHAPES
    return [Case("imagen" if s[1] == 3 else "sd-latent", s, dt) for dt in dtypes for s in shapes]


def diffusers_threshold(x, percentile=PERCENTILE, max_value=MAX_VALUE):
    """DDPMScheduler._threshold_sample (diffusers 0.3x), the reference of this benchmark."""
    dtype = x.dtype
    B = x.shape[0]
    a = x.reshape(B, -1).float()
    s = torch.quantile(a.abs(), percentile, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(a, -s, s) / s).reshape(x.shape).to(dtype)


def candidates(case, device, compile_reference=True):
    """[(name, fn, note)] for one case: the reference, torch.compile of it, every usable backend."""
    x = torch.randn(case.shape, device=device, dtype=case.dtype) * 3
    out = [("reference", lambda: diffusers_threshold(x), "eager: torch.quantile (diffusers)")]
    if compile_reference:
        out.append(harness.compile_candidate(diffusers_threshold, x))
    # (the op's reference backend, float64 torch.quantile, is slower than the float32 baseline above)
    would_run = lambda n: ops.dynamic_threshold_backend(x, PERCENTILE, MAX_VALUE, backend=n)  # noqa: E731
    for name in harness.kernel_backends(OP, device, would_run):
        out.append((name, lambda n=name: ops.dynamic_threshold(x, PERCENTILE, MAX_VALUE, backend=n), ""))
    return out, x.numel() * x.element_size() * 2


def run(device, quick=False, compile_reference=True, log=print):
    return harness.run_cases(OP, cases(device, quick), lambda c: candidates(c, device, compile_reference), device,
                             lambda c: (f"{c.name} {tuple(c.shape)}", str(c.dtype)[6:], "contiguous"), log)


def targets(rows, device, copy_gbps):
    """Acceptance targets checked against measured rows: [(text, passed)]."""
    out = []
    if device.type != "cpu":
        return out  # no GPU target stated yet: the table is the record
    for r in rows:
        if r.backend == "cpu" and tuple(r.shape) == TARGET_SHAPE and r.dtype == "float32":
            out.append(harness.target(f"cpu {r.case} fp32 vs torch.quantile", r.speedup_vs_reference, CPU_TARGET,
                                      r, "{:.1f}x"))
    return out
