"""Scheduler step benchmark: one sampling step with classifier-free guidance, diffkern's scheduler
(guidance, x0 conversion and the multistep / Euler combination in one fused op call) against
diffusers' own scheduler of the same name and config with the guidance combine done the way its
pipelines do it (uncond + w * (cond - uncond), then step).

Each step is timed mid-schedule (step 3 of 20, so the multistep samplers combine their full
history): the scheduler state after the warm-up steps is restored before every timed call, for both
sides alike. scale_model_input (the UNet's input scaling of the sigma samplers) is not in the timed
call, on either side. Bytes counted: sample, cond and uncond read once, prev_sample written once (a lower
bound: the history tensors and any noise are read too).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch

from diffkern.bench import harness

OP = "schedulers"
GUIDANCE = 7.5
STEPS, WARMUP = 20, 3
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
# (label, diffusers class name, config, multistep: held to the CPU target)
SAMPLERS = [
    ("PNDM (PLMS)", "PNDMScheduler", {**SD, "skip_prk_steps": True, "steps_offset": 1}, True),
    ("Euler", "EulerDiscreteScheduler", SD, False),
    ("Euler a", "EulerAncestralDiscreteScheduler", SD, False),
    ("Heun", "HeunDiscreteScheduler", SD, False),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {**SD, "use_karras_sigmas": True}, True),
    ("DPM++ 3M", "DPMSolverMultistepScheduler", {**SD, "solver_order": 3}, True),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
     {**SD, "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}, True),
    ("UniPC", "UniPCMultistepScheduler", SD, True),
    ("UniPC order 3", "UniPCMultistepScheduler", {**SD, "solver_order": 3}, True),
    ("DDIM", "DDIMScheduler", {**SD, "clip_sample": False, "steps_offset": 1}, False),
    ("DDPM", "DDPMScheduler", {**SD, "clip_sample": False}, False),
    ("UnCLIP (Karlo decoder)", "UnCLIPScheduler", {"variance_type": "learned_range"}, False),
]
SHAPES = [("sd-latent", (2, 4, 64, 64)), ("if-pixel", (4, 3, 256, 256))]
CPU_TARGET = 5.0


@dataclass
class Case:
    name: str
    shape: tuple
    dtype: torch.dtype
    label: str
    cls_name: str
    config: dict
    multistep: bool


def cases(device, quick=False):
    shapes = SHAPES[:1] if quick else SHAPES
    samplers = [s for s in SAMPLERS if s[0] in ("Euler", "DPM++ 2M Karras")] if quick else SAMPLERS
    return [Case(sname, shape, torch.float32, label, cls, cfg, ms)
            for sname, shape in shapes for label, cls, cfg, ms in samplers]


class _Stepper:
    """A scheduler warmed up to step WARMUP; call() restores that state and runs one guided step."""

    def __init__(self, sched, x, cond, uncond, fused, generator_seed=0):
        self.s, self.x, self.cond, self.uncond, self.fused = sched, x, cond, uncond, fused
        sched.set_timesteps(STEPS)
        self.gen = torch.Generator().manual_seed(generator_seed)
        ts = sched.timesteps
        self.kw = {"generator": self.gen} if "generator" in inspect.signature(sched.step).parameters else {}
        order = getattr(sched, "order", 1)  # diffusers' UnCLIPScheduler has none
        for t in ts[:WARMUP * order]:
            self._step(t, scale_input=True)
        self.t = ts[WARMUP * order]
        sched.scale_model_input(x, self.t)  # sets the step index (and diffusers' is_scale_input_called)
        self.state = self._snapshot()

    def _snapshot(self):
        return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(self.s).items()}

    def _restore(self):
        for k, v in self.state.items():
            setattr(self.s, k, list(v) if isinstance(v, list) else v)

    def _step(self, t, scale_input=False):
        if scale_input:  # the pipeline's model-input scaling: not part of the timed step (it feeds the UNet)
            self.s.scale_model_input(self.x, t)
        if self.fused:
            return self.s.step(self.cond, t, self.x, uncond_output=self.uncond, guidance_scale=GUIDANCE, **self.kw)
        C = self.x.shape[1]
        pred = self.uncond[:, :C] + GUIDANCE * (self.cond[:, :C] - self.uncond[:, :C])
        if self.cond.shape[1] != C:  # learned variance: the unCLIP pipelines append the cond variance channels
            pred = torch.cat([pred, self.cond[:, C:]], dim=1)
        return self.s.step(pred, t, self.x, **self.kw)

    def __call__(self):
        self._restore()
        return self._step(self.t)


def _diffusers_class(name):
    import diffusers

    if name != "LMSDiscreteScheduler":
        return getattr(diffusers, name)
    raise ValueError("LMS needs scipy in diffusers")


def candidates(case, device, compile_reference=True):
    import diffkern.schedulers as S

    g = torch.Generator().manual_seed(0)
    shape = case.shape
    x = torch.randn(shape, generator=g) * 3
    C = shape[1]
    out_shape = (shape[0], 2 * C) + tuple(shape[2:]) if case.cls_name == "UnCLIPScheduler" else shape
    cond, uncond = (torch.randn(out_shape, generator=g) for _ in range(2))
    ours = S.scheduler_class(case.cls_name)(**case.config)
    rows = []
    try:
        theirs = _diffusers_class(case.cls_name)(**copy.deepcopy(case.config))
        rows.append(("reference", _Stepper(theirs, x, cond, uncond, fused=False),
                     "diffusers' step + the pipeline's CFG combine"))
    except (ImportError, ValueError) as e:  # no diffusers: the diffkern row alone
        rows.append(("reference", None, f"diffusers unavailable: {e}"))
    rows.append(("diffkern", _Stepper(ours, x, cond, uncond, fused=True),
                 "one fused op (cpu kernel) with the CFG combine"))
    return rows, x.numel() * x.element_size() * 4


def run(device, quick=False, compile_reference=True, log=print):
    if device.type != "cpu":
        log("  schedulers suite: CPU only for now (the GPU rows belong to the GPU model issue)")
        return []
    return harness.run_cases(OP, cases(device, quick), lambda c: candidates(c, device, compile_reference), device,
                             lambda c: (f"{c.label} {c.name} {tuple(c.shape)}", str(c.dtype)[6:], "cfg"), log)


def targets(rows, device, copy_gbps):
    """Issue 12's CPU target: >= 5x diffusers' step for the multistep samplers with CFG."""
    multistep = {label for label, _, _, ms in SAMPLERS if ms}
    out = []
    for r in rows:
        label = next((m for m in multistep if r.case.startswith(m + " ")), None)
        if device.type == "cpu" and r.backend == "diffkern" and label and r.median_us == r.median_us:
            out.append(harness.target(f"cpu {r.case} vs diffusers' step", r.speedup_vs_reference, CPU_TARGET, r,
                                      "{:.1f}x"))
    return out
