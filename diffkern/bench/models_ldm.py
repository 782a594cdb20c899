"""Latent Diffusion release and SDXL rows, random weights:

    python -m diffkern.bench.models_ldm [--device cpu|cuda] [--full-size] [--out benchmarks/results]


- sdxl-unet-step: the SDXL base UNet (2.57 B parameters: depths 1 / 2 / 10, 2048-wide context, "text_time"
  micro-conditioning), CFG batch 2; 128 x 128 latents (1024 pixels) on a GPU.
- cin256-unet-step: the class-conditional ImageNet LDM's UNet (cin256-v2: 192 channels, mult 1/2/3/5,
  32-wide heads, one-token 512 context), CFG batch 2, 3 x 64 x 64 latents.
- vq-f4-decode: the LDM VQ-f4 autoencoder (128/256/512 channels, 8192 codes) decoding 3 x 64 x 64 latents
  to 256 x 256 pixels, quantization included.
- sdxl-end-to-end: diffusers' StableDiffusionXLPipeline against diffkern's (the same __call__; diffkern's
  UNet, VAE and scheduler), CFG, Euler; text encoders transformers' on both sides.

Candidates side by side in one process: the diffkern model on the reference backend (plain PyTorch: the
speed-up baseline), diffkern on its automatic backends, diffusers eager (SDPA). On a CPU (without
--full-size) the inputs shrink: SDXL at 32 x 32 latents with channels (64, 128, 256) and its depths, cin256
at 32 x 32 latents, VQ decode of 32 x 32 latents, the end-to-end run at 256 pixels (32 x 32 latents) for
3 steps with that UNet, a 2-level VAE and small CLIP encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import diffkern
from diffkern.bench import harness

OP = "models_ldm"

SDXL_BASE = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
# CPU: SDXL's depths at narrow widths, a 256-wide context (64 + 192 from the two encoders), 64-wide pooled
SDXL_CPU = dict(SDXL_BASE, block_out_channels=(64, 128, 256), attention_head_dim=(1, 2, 4),
                cross_attention_dim=256, projection_class_embeddings_input_dim=64 + 6 * 256)
# cin256-v2.yaml's UNet in diffusers' layout (what the CompVis loader builds)
CIN256_UNET = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
                   block_out_channels=(192, 384, 576, 960),
                   down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                   up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
                   attention_head_dim=(6, 12, 18, 30), cross_attention_dim=512)
VQ_F4 = dict(in_channels=3, out_channels=3, latent_channels=3, layers_per_block=2, num_vq_embeddings=8192,
             block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, sample_size=256, vq_embed_dim=3)


CPU_LATENT = 32  # latent side of every row on a CPU without --full-size (the tests shrink it)


@dataclass
class Case:
    name: str
    kind: str        # "sdxl-unet", "cin-unet", "vq-decode", "sdxl-pipe"
    shape: tuple
    dtype: torch.dtype
    config: dict
    steps: int = 1


def cases(device, quick=False, full_size=False):
    full = device.type == "cuda" or full_size
    dt = torch.float16 if device.type == "cuda" else torch.float32
    tag = "" if full else " (reduced width)"
    xl = 128 if full else CPU_LATENT
    out = [Case("sdxl-unet-step" + tag, "sdxl-unet", (2, 4, xl, xl), dt, SDXL_BASE if full else SDXL_CPU)]
    if quick:
        return out
    side = 64 if full else CPU_LATENT
    out += [Case("cin256-unet-step", "cin-unet", (2, 3, side, side), dt, CIN256_UNET),
            Case("vq-f4-decode", "vq-decode", (1, 3, side, side), dt, VQ_F4),
            Case("sdxl-end-to-end" + tag, "sdxl-pipe", (1, 4, xl, xl), dt, SDXL_BASE if full else SDXL_CPU,
                 steps=30 if full else 3)]
    return out


def _pooled_width(config):
    """The second text encoder's projection width, what the "text_time" embedding adds to 6 time ids."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def _randn(g, device, dtype, *shape):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _unet_callables(case, device, diffusers):
    from diffkern.models import from_diffusers

    g = torch.Generator().manual_seed(0)
    B = case.shape[0]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**case.config).to(device=device, dtype=case.dtype).eval()
    ours = from_diffusers(ref).eval()
    x, t = _randn(g, device, case.dtype, *case.shape), torch.tensor(500, device=device)
    if case.kind == "sdxl-unet":
        ctx = _randn(g, device, case.dtype, B, 77, case.config["cross_attention_dim"])
        pooled = _pooled_width(case.config)
        px = 8 * case.shape[-1]
        added = {"text_embeds": _randn(g, device, case.dtype, B, pooled),
                 "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * B, device=device, dtype=case.dtype)}
    else:
        ctx, added = _randn(g, device, case.dtype, B, 1, 512), None

    def call(m):
        return m(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample

    return {"diffkern": lambda: call(ours), "diffusers": lambda: call(ref)}


def _vq_callables(case, device, diffusers):
    from diffkern.pipelines.ldm._components import convert_component

    torch.manual_seed(0)
    ref = diffusers.VQModel(**case.config).to(device=device, dtype=case.dtype).eval()
    ours = convert_component(ref).to(device=device, dtype=case.dtype).eval()
    h = _randn(torch.Generator().manual_seed(0), device, case.dtype, *case.shape)
    return {"diffkern": lambda: ours.decode(h).sample, "diffusers": lambda: ref.decode(h).sample}


def _sdxl_pipes(case, device, diffusers):
    """(diffusers pipeline, diffkern pipeline) with the same random components."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffkern.pipelines import StableDiffusionXLPipeline

    full = case.config is SDXL_BASE
    pooled = _pooled_width(case.config)
    width1 = 768 if full else 64  # CLIP ViT-L; the rest of the context is OpenCLIP bigG's (1280)
    ctx, vocab = case.config["cross_attention_dim"], 49408 if full else 1000
    torch.manual_seed(0)

    def text(cls, hidden, layers, heads, projection=None):
        cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads,
                             num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=77,
                             projection_dim=projection or hidden, hidden_act="gelu")
        return cls(cfg).to(device=device, dtype=case.dtype).eval()

    enc1 = text(CLIPTextModel, width1, 12 if full else 2, 12 if full else 2)
    enc2 = text(CLIPTextModelWithProjection, ctx - width1, 32 if full else 2, 20 if full else 2, pooled)
    vae_cfg = dict(block_out_channels=(128, 256, 512, 512) if full else (32, 32, 32, 32),
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   latent_channels=4, layers_per_block=2 if full else 1, norm_num_groups=32,
                   sample_size=1024 if full else 256, scaling_factor=0.13025, force_upcast=False)
    unet = diffusers.UNet2DConditionModel(**case.config).to(device=device, dtype=case.dtype).eval()
    vae = diffusers.AutoencoderKL(**vae_cfg).to(device=device, dtype=case.dtype).eval()
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                             beta_schedule="scaled_linear", steps_offset=1,
                                             timestep_spacing="leading")
    theirs = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=enc1, text_encoder_2=enc2,
                                                 tokenizer=None, tokenizer_2=None, unet=unet, scheduler=sched)
    theirs.set_progress_bar_config(disable=True)
    ours = StableDiffusionXLPipeline.from_diffusers_pipeline(theirs)
    return theirs, ours, enc1, enc2, vocab


def _pipe_callables(case, device, diffusers):
    theirs, ours, enc1, enc2, vocab = _sdxl_pipes(case, device, diffusers)
    g = torch.Generator().manual_seed(0)
    # The prompt embeddings as SDXL builds them (penultimate states of both encoders, concatenated; the
    # second encoder's pooled projection), from random token ids: no tokenizer files are needed.
    ids = torch.randint(0, vocab, (2, 77), generator=g).to(device)
    with torch.no_grad():
        h1 = enc1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = enc2(ids, output_hidden_states=True)
        embeds = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        pooled = out2.text_embeds
    side = 8 * case.shape[-1]
    args = dict(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], pooled_prompt_embeds=pooled[:1],
                negative_pooled_prompt_embeds=pooled[1:], num_inference_steps=case.steps, height=side,
                width=side, guidance_scale=5.0, output_type="pt")

    def run(pipe):
        return pipe(**args, generator=torch.Generator().manual_seed(0)).images

    return {"diffkern": lambda: run(ours), "diffusers": lambda: run(theirs)}


def _callables(case, device):
    import diffusers

    if case.kind in ("sdxl-unet", "cin-unet"):
        return _unet_callables(case, device, diffusers)
    if case.kind == "vq-decode":
        return _vq_callables(case, device, diffusers)
    return _pipe_callables(case, device, diffusers)


def _with_reference(fn):
    with diffkern.use_backend("reference"):
        return fn()


def run(device, quick=False, compile_reference=True, log=print, full_size=False, only=None):
    """Rows for `python -m diffkern.bench --ops models_ldm` (no torch.compile peers: whole pipelines and
    2.6 B-parameter UNets compile for minutes)."""
    import diffusers

    rows = []
    for case in cases(device, quick, full_size):
        if only and not any(part in case.name for part in only):
            continue
        fns = _callables(case, device)
        cands = [("reference", lambda f=fns["diffkern"]: _with_reference(f), "diffkern, reference backend"),
                 ("diffkern", fns["diffkern"], "automatic backends"),
                 ("diffusers", fns["diffusers"], f"diffusers {diffusers.__version__} eager (SDPA)")]
        with torch.inference_mode():
            times = harness.timing.interleaved({n: fn for n, fn, _ in cands}, device, min_rounds=3,
                                               max_rounds=9 if device.type == "cpu" else 15,
                                               case_seconds=3.0 if device.type == "cpu" else 2.0)
        steps = f" x{case.steps} steps" if case.kind == "sdxl-pipe" else ""
        label = f"{case.name} {tuple(case.shape)}{steps}"
        rows += harness.case_rows(OP, case.shape, (label, str(case.dtype)[6:], case.kind), cands, times,
                                  ("diffusers",))
        log(f"  {label}: " + ", ".join(f"{n} {t.median * 1e3:.1f}ms" for n, t in times.items() if t))
    return rows


def targets(rows, device, copy_gbps):
    """No issue targets for these rows: the table reports the ratios."""
    return []


def main(argv=None):
    """Run the rows and write models_ldm-<device>.json / .md (+ CSV) under --out. Not a suite of
    `python -m diffkern.bench` (yet): its smoke test runs every suite's rows once, and these cost tens of
    seconds on a CPU even when reduced."""
    import argparse
    import re

    from diffkern.bench import report

    p = argparse.ArgumentParser(prog="python -m diffkern.bench.models_ldm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full-size", action="store_true", help="on a CPU: the released sizes")
    p.add_argument("--quick", action="store_true", help="the SDXL UNet step only")
    p.add_argument("--out", default="benchmarks/out", help="results folder (official: benchmarks/results)")
    p.add_argument("--cases", nargs="+", default=None, metavar="NAME",
                   help="only the rows whose name contains one of these (sdxl-unet, cin256, vq-f4, "
                   "end-to-end)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    allocator = harness.pin_cpu_allocator() if device.type == "cpu" else None
    env = harness.environment(device, allocator)
    env.update(harness.timing.machine_state())
    rows = run(device, quick=args.quick, full_size=args.full_size, only=args.cases)
    tag = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
    stem = f"{OP}-{tag}{'-full-size' if args.full_size else ''}" + "".join(f"-{c}" for c in args.cases or ())
    _, report_md = report.write_reports(rows, args.out, stem, device.type)
    json_path, md_path = harness.write_results(rows, env, args.out, stem, [__doc__, ""] + report_md)
    print(harness.format_table(rows))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
