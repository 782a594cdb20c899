"""End-to-end pipelines per family, as users read them: seconds per image, denoising it/s, peak memory.

Random weights at the released configurations (speed does not depend on the values), one image
per call with classifier-free guidance:

- sd15: StableDiffusionPipeline, SD 1.5's UNet and VAE, DDIM; 512x512 x 50 steps on a GPU (fp16).
  The text encoder is left out (prompt_embeds of 77 x 768 are given): it is one call per prompt.
  Peer: diffusers' StableDiffusionPipeline (eager, SDPA) with the same weights and embeddings.
- glide: GlidePipeline, base 64x64 x 100 DDPM steps + upsampler 256x256 x 27 DDIM steps (fast27),
  OpenAI's use_fp16 on a GPU; token ids given (no tokenizer). it/s is the base stage's.

On a CPU the sizes are reduced (SD 64x64 pixels x 3 steps; GLIDE base 32x32 x 3 steps, upsampler
64x64 x 2 steps; full channel widths) so that the suite takes a minute or two, and "peak memory" is
the process's RSS high-water mark (it only grows: read it as an upper bound per row).
Each pipeline runs once to warm up, then is timed interleaved with the others (median of 5 runs on
a GPU, 3 on a CPU; `make bench`'s quick suite: SD only, 1 step on a CPU) on the
reference backend (plain PyTorch ops: the speed-up baseline), on diffkern's automatic backends
and, for SD, diffusers. Add a family: a function (device, full) -> Setup in FAMILIES.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch

import diffkern
from diffkern.bench import harness

OP = "end_to_end"
ROUNDS = {"cuda": 5, "cpu": 3}  # interleaved calls per backend (after one warm-up call each)


@dataclass
class Setup:
    family: str
    size: str
    steps: str
    dtype: torch.dtype
    calls: dict  # backend name -> () -> images
    denoiser: dict  # backend name -> the module whose forward is one denoising step (it/s is timed on it)
    notes: dict = field(default_factory=dict)


def _sd15(device, full, steps=None):
    from diffkern.bench.models import SD15_UNET, SD_VAE, _diffusers
    from diffkern.models import from_diffusers
    from diffkern.pipelines import StableDiffusionPipeline
    from diffkern.pipelines.stable_diffusion import sd_scheduler_config
    from diffkern.schedulers import DDIMScheduler

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    px, steps = (512, steps or 50) if full else (64, steps or 3)
    d = _diffusers()
    torch.manual_seed(0)
    sched_cfg = sd_scheduler_config(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                                         clip_sample=False))
    if d is not None:
        ref_unet = d.UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval()
        ref_vae = d.AutoencoderKL(**SD_VAE).to(device, dtype).eval()
        unet, vae = from_diffusers(ref_unet).eval(), from_diffusers(ref_vae).eval()
    else:
        unet = diffkern.models.UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval()
        vae = diffkern.models.AutoencoderKL(**SD_VAE).to(device, dtype).eval()
    pipe = StableDiffusionPipeline(unet, vae, None, None, DDIMScheduler.from_config(sched_cfg))
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 77, SD15_UNET["cross_attention_dim"], generator=g).to(device, dtype)
    uncond = torch.randn(1, 77, SD15_UNET["cross_attention_dim"], generator=g).to(device, dtype)
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=px, width=px, output_type="pt")

    def ours():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, progress=False,
                    generator=torch.Generator().manual_seed(0), **kw).images

    calls, denoiser, notes = {"reference": _on_reference(ours), "diffkern": ours}, {}, {}
    denoiser.update(reference=unet, diffkern=unet)
    if d is not None:
        ref = d.StableDiffusionPipeline(vae=ref_vae, text_encoder=None, tokenizer=None, unet=ref_unet,
                                        scheduler=d.DDIMScheduler.from_config(sched_cfg), safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        calls["diffusers"] = lambda: ref(prompt_embeds=cond, negative_prompt_embeds=uncond,
                                         generator=torch.Generator().manual_seed(0), **kw).images
        denoiser["diffusers"] = ref_unet
        notes["diffusers"] = f"diffusers {d.__version__} eager (SDPA)"
    return Setup("sd15", f"{px}x{px}", str(steps), dtype, calls, denoiser, notes)


def _glide(device, full):
    from diffkern.models import glide
    from diffkern.pipelines import GlidePipeline

    fp16 = device.type == "cuda"
    base_o, up_o = glide.model_and_diffusion_defaults(), glide.model_and_diffusion_defaults_upsampler()
    if not full:
        # half the released sizes, the same widths; channel_mult "" means "the default for image_size",
        # which exists only for the released sizes: the released lists less their last level
        base_o = dict(base_o, image_size=32, channel_mult=base_o["channel_mult"] or "1,2,3")
        up_o = dict(up_o, image_size=64, channel_mult=up_o["channel_mult"] or "1,1,2,2")
    base_r, up_r = ("100", "fast27") if full else ("3", "2")
    torch.manual_seed(0)
    base = glide.create_model(**dict(base_o, use_fp16=fp16)).to(device).eval()
    up = glide.create_model(**dict(up_o, use_fp16=fp16)).to(device).eval()
    pipe = GlidePipeline(base, dict(base_o, use_fp16=fp16), up, dict(up_o, use_fp16=fp16))

    def ours():
        return pipe(tokens=[11, 22, 33, 44], guidance_scale=3.0, base_respacing=base_r, upsample_respacing=up_r,
                    generator=torch.Generator().manual_seed(0), output_type="pt", progress=False).images

    steps = f"{base_r}+{up_r}"
    size = f"{base_o['image_size']}->{up_o['image_size']}"
    return Setup("glide", size, steps, torch.float16 if fp16 else torch.float32,
                 {"reference": _on_reference(ours), "diffkern": ours}, {"reference": base, "diffkern": base},
                 {"diffkern": "it/s: base stage"})


FAMILIES = {"sd15": _sd15, "glide": _glide}


def _on_reference(fn):
    def call():
        with diffkern.use_backend("reference"):
            return fn()

    return call


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_once(fn, module, device):
    """(seconds, denoising steps per second, peak MiB) of one call of fn; the step rate from the start
    times of the denoiser's forward calls (n calls = n - 1 whole steps between them)."""
    starts = []

    def stamp(*_):  # returns None: a pre-hook's return value would replace the module's inputs
        _sync(device)
        starts.append(time.perf_counter())

    hook = module.register_forward_pre_hook(stamp)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        t = time.perf_counter() - t0
    finally:
        hook.remove()
    rate = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else float("nan")
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    return t, rate, peak


def run(device, quick=False, compile_reference=False, log=print, full_size=False):
    """Rows of every family (quick: sd15 only, 1 step on a CPU); compile_reference is not used (no compiled peer).
    The backends of a family run interleaved, one call each per round (3 rounds on a CPU, 5 on a GPU),
    after one warm-up call each."""
    full = device.type == "cuda" or full_size
    rounds = ROUNDS.get(device.type, 3)
    rows = []
    for name, make in FAMILIES.items():
        if quick and name != "sd15":
            continue
        s = make(device, full, **({"steps": 1} if quick and not full else {}))
        samples = {b: [] for b in s.calls}
        with torch.inference_mode():
            for b, fn in s.calls.items():
                fn()  # warm-up
            order = list(s.calls)
            for r in range(rounds):
                for i in range(len(order)):
                    b = order[(i + r) % len(order)]
                    samples[b].append(_measure_once(s.calls[b], s.denoiser[b], device))
        times = {b: harness.timing.Timing([m[0] for m in ms]) for b, ms in samples.items()}
        label = f"{s.family} {s.size} x{s.steps} steps"
        for b, ms in samples.items():
            t = times[b]
            rates = sorted(m[1] for m in ms)
            extra = {"family": s.family, "size": s.size, "steps": s.steps, "s_per_image": t.median,
                     "denoise_it_s": rates[len(rates) // 2], "peak_mib": max(m[2] for m in ms),
                     "peak_is_rss": device.type != "cuda"}
            rows.append(harness.timed_row(OP, label, (1,), str(s.dtype)[6:], "pipeline", b, t, times["reference"],
                                          None, s.notes.get(b, ""), extra))
        log(f"  {label}: " + ", ".join(f"{b} {t.median:.2f} s/image" for b, t in times.items()))
        del s  # the next family's models are built after this one's are freed (peak memory, RSS)
    return rows


def targets(rows, device, copy_gbps):
    """No targets: the table is for reading."""
    return []
