"""Model-step benchmarks at the released configurations with random weights (speed does not
depend on the values): the SD 1.5 UNet step (batch 2 for guidance, 77 tokens), the SD 2.1 UNet
step, the SD VAE decode, a whole SD 1.5 denoising loop (UNet + guidance + scheduler + decode), and
the GLIDE base step (64x64, batch 2 for guidance, 128 tokens) and upsampler step (256x256), and the
Karlo (unCLIP) prior, decoder and super-resolution steps (diffkern.bench.models_unclip).

Candidates side by side in one process: the diffkern model on the reference backend (plain
PyTorch ops: the speed-up baseline), the diffkern model on its automatic backends, diffusers eager
(its default SDPA attention processor), torch.compile of diffusers and of diffkern. "x best peer"
is against the faster of the two diffusers candidates. Peak memory (CUDA only) is in the note.

GLIDE has no diffusers counterpart: its rows compare the reference backend, the fast path and
torch.compile of the fast path.

Sizes: the released ones (512x512 for SD 1.5, 768x768 for SD 2.1, GLIDE 64 and 256) on a GPU or
with --full-size; on a CPU by default reduced inputs (SD latent 16x16, GLIDE base 32x32, upsampler
64x64) with the full channel configurations, and 5 steps instead of 50 for the loop, so that the
suite finishes in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import diffkern
from diffkern.bench import harness

OP = "models"

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512)
GUIDANCE = 7.5


@dataclass
class Case:
    name: str
    kind: str        # "unet", "vae", "loop" or "glide"
    shape: tuple     # the latent (B, 4, h, w)
    dtype: torch.dtype
    config: dict
    steps: int = 1


def cases(device, quick=False, full_size=False):
    full = device.type == "cuda" or full_size
    dt = torch.float16 if device.type == "cuda" else torch.float32
    lat15, lat21 = (64, 96) if full else (16, 16)
    out = [Case("sd15-unet-step", "unet", (2, 4, lat15, lat15), dt, SD15_UNET)]
    if quick:
        return out
    out += [Case("sd21-unet-step", "unet", (2, 4, lat21, lat21), dt, SD21_UNET),
            Case("sd-vae-decode", "vae", (1, 4, lat15, lat15), dt, SD_VAE),
            Case("sd15-loop", "loop", (1, 4, lat15, lat15), dt, SD15_UNET, steps=50 if full else 5)]
    from diffkern.models import glide

    base, up = glide.model_and_diffusion_defaults(), glide.model_and_diffusion_defaults_upsampler()
    out += [Case("glide-base-step", "glide", (2, 3, 64 if full else 32, 64 if full else 32), dt, base),
            Case("glide-upsample-step", "glide", (1, 3, 256 if full else 64, 256 if full else 64), dt, up)]
    from diffkern.bench import models_unclip  # Karlo prior / decoder / SR steps

    out += [Case(name, kind, shape, dt, cfg) for name, kind, shape, cfg in models_unclip.case_specs(full)]
    from diffkern.bench import models_if  # DeepFloyd IF stage I / II / III steps and the fused update

    out += [Case(name, kind, shape, dt, cfg) for name, kind, shape, cfg in models_if.case_specs(full)]
    return out


def _diffusers():
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def _models(case, device):
    """(diffusers module or None, diffkern module) with the same random weights."""
    from diffkern.models import from_diffusers

    d = _diffusers()
    cls = "UNet2DConditionModel" if case.kind in ("unet", "loop") else "AutoencoderKL"
    torch.manual_seed(0)
    if d is not None:
        ref = getattr(d, cls)(**case.config).to(device=device, dtype=case.dtype).eval()
        return ref, from_diffusers(ref).eval()
    ours = getattr(diffkern.models, cls)(**case.config).to(device=device, dtype=case.dtype).eval()
    return None, ours


def _unet_step(unet, x, t, ctx, returns_object):
    out = unet(x, t, ctx)  # both models return diffusers' output object now (the flag is kept for callers)
    return out if isinstance(out, torch.Tensor) else out[0]


def _loop(unet, vae, scheduler, latents, ctx, steps, returns_object):
    """CFG denoising loop as the SD pipelines run it, then the VAE decode."""
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps = _unet_step(unet, inp, t, ctx, returns_object)
        uncond, cond = eps.chunk(2)
        x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    img = vae.decode(x / 0.18215)
    return img if isinstance(img, torch.Tensor) else img[0]


def _glide_callables(case, device):
    from diffkern.models import glide

    torch.manual_seed(0)
    # use_fp16 is OpenAI's mixed precision (fp16 torso, fp32 norms/embeddings): the GPU setting
    model = glide.create_model(**dict(case.config, use_fp16=case.dtype == torch.float16)).to(device).eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    B, ctx = case.shape[0], case.config["text_ctx"]
    x = torch.randn(case.shape, generator=g).to(device)
    tokens = torch.randint(0, 50257, (B, ctx), generator=g).to(device)
    mask = torch.ones(B, ctx, dtype=torch.bool, device=device)
    t = torch.full((B,), 500, device=device)
    low = None
    if case.config.get("super_res"):
        low = torch.randn(B, 3, case.shape[2] // 4, case.shape[3] // 4, generator=g).to(device)
    return {"diffkern": lambda: model(x, t, tokens, mask, low_res=low)}


def _callables(case, device):
    """{name: fn} for the diffkern and diffusers versions of the case."""
    if case.kind == "glide":
        return _glide_callables(case, device)
    if case.kind.startswith("if-"):
        from diffkern.bench import models_if

        return models_if.callables(case, device, _diffusers())
    if case.kind.startswith("unclip"):
        from diffkern.bench import models_unclip

        return models_unclip.callables(case, device, _diffusers())
    ref, ours = _models(case, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(case.shape, generator=g).to(device=device, dtype=case.dtype)
    fns = {}
    if case.kind == "unet":
        ctx = torch.randn(case.shape[0], 77, case.config["cross_attention_dim"], generator=g).to(device, case.dtype)
        t = torch.tensor(500, device=device)
        fns["diffkern"] = lambda: ours(x, t, ctx).sample
        if ref is not None:
            fns["diffusers"] = lambda: ref(x, t, ctx).sample
    elif case.kind == "vae":
        fns["diffkern"] = lambda: ours.decode(x)
        if ref is not None:
            fns["diffusers"] = lambda: ref.decode(x).sample
    else:
        vae_ref, vae = _models(Case("vae", "vae", case.shape, case.dtype, SD_VAE), device)
        ctx = torch.randn(2 * case.shape[0], 77, case.config["cross_attention_dim"], generator=g).to(device, case.dtype)
        sched_cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        ours_sched = diffkern.schedulers.DDIMScheduler.from_config(sched_cfg)
        fns["diffkern"] = lambda: _loop(ours, vae, ours_sched, x, ctx, case.steps, False)
        if ref is not None:
            ref_sched = _diffusers().DDIMScheduler.from_config(sched_cfg)
            fns["diffusers"] = lambda: _loop(ref, vae_ref, ref_sched, x, ctx, case.steps, True)
    return fns


def _peak_mb(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def _time_case(case, device, compile_peers):
    fns = _callables(case, device)
    cands = [("reference", lambda: _with_reference(fns["diffkern"]), "diffkern model, reference backend"),
             ("diffkern", fns["diffkern"], "automatic backends")]
    if "diffusers" in fns:
        cands.append(("diffusers", fns["diffusers"], f"diffusers {_diffusers().__version__} eager (SDPA)"))
    if compile_peers and case.kind != "loop":  # compiling a 50-step Python loop measures the compiler
        for name in [n for n in ("diffusers", "diffkern") if n in fns]:
            if name == "diffkern" and case.kind == "glide":  # no diffusers peer: compile the reference too
                c, why = harness.compile_checked(lambda: _with_reference(fns["diffkern"]))
                cands.append(("reference+compile", c, why or "torch.compile (inductor) of the reference backend"))
            c, why = harness.compile_checked(fns[name])
            cands.append((f"{name}+compile", c, why or "torch.compile (inductor)"))
    # a model step takes 0.1-2 s on a CPU: few rounds, one call each (the spread still shows the noise)
    times = harness.timing.interleaved({n: fn for n, fn, _ in cands}, device, min_rounds=5, max_rounds=15,
                                       case_seconds=3.0 if device.type == "cpu" else 2.0)
    mems = {name: _peak_mb(fn, device) if times.get(name) is not None else None for name, fn, _ in cands}
    return cands, times, mems


def _with_reference(fn):
    with diffkern.use_backend("reference"):
        return fn()


def run(device, quick=False, compile_reference=True, log=print, full_size=False):
    rows = []
    for case in cases(device, quick, full_size):
        with torch.inference_mode():
            cands, times, mems = _time_case(case, device, compile_reference)
        label = f"{case.name} {tuple(case.shape)}" + (f" x{case.steps} steps" if case.kind == "loop" else "")
        notes = [(n, fn, f"{note}; peak {mems[n]:.0f} MiB".lstrip("; ") if mems[n] is not None else note)
                 for n, fn, note in cands]
        rows += harness.case_rows(OP, case.shape, (label, str(case.dtype)[6:], case.kind), notes, times,
                                  ("diffusers", "diffusers+compile"),
                                  extras={n: {"peak_mib": mems[n]} for n in mems if times.get(n) is not None})
        log(f"  {label}: " + ", ".join(f"{n} {t.median * 1e3:.1f}ms" for n, t in times.items() if t))
    return rows


def targets(rows, device, copy_gbps):
    """Issue 5's targets are for the H200 (fp16, batch 2, 512x512); on a CPU report the ratios only."""
    from diffkern.bench import models_if

    if_targets = models_if.targets(rows, device)
    from diffkern.bench import models_unclip

    out = models_unclip.targets(rows, device)
    for r in rows:
        if device.type != "cuda" or not r.case.startswith("sd15-unet-step") or r.backend != "diffkern":
            continue
        by = {x.backend: x for x in rows if x.case == r.case}
        if "diffusers" in by:
            out.append(harness.target(f"SD 1.5 UNet step {r.dtype} vs diffusers eager",
                                      by["diffusers"].median_us / r.median_us, 1.5, harness.weakest(r, by["diffusers"])))
        if "diffusers+compile" in by and by["diffusers+compile"].median_us == by["diffusers+compile"].median_us:
            out.append(harness.target(f"SD 1.5 UNet step {r.dtype} vs diffusers under torch.compile",
                                      by["diffusers+compile"].median_us / r.median_us, 1.15,
                                      harness.weakest(r, by["diffusers+compile"])))
        if by.get("diffusers") and r.extra.get("peak_mib") is not None:
            ok = r.extra["peak_mib"] <= by["diffusers"].extra.get("peak_mib", float("inf"))
            out.append((f"SD 1.5 UNet step peak memory {r.extra['peak_mib']:.0f} MiB vs diffusers "
                        f"{by['diffusers'].extra['peak_mib']:.0f} MiB (target: no higher)", ok))
    return out + if_targets
