"""CPU side-by-side checks behind README numbers that the main suites do not produce, in one process,
one thread (on a 2-core machine OpenMP fork/join noise swamps small models), interleaved so that load
drift hits both sides alike:

1. a diffusers UNet / VAE decode, unpatched vs `diffkern.patch`ed (alternating call by call);
2. diffkern's UNet2DConditionModel vs diffusers' at the IF-I and Karlo-decoder layouts (reduced widths);
3. DeepFloyd IF's per-step update: diffusers' CFG split/cat + DDPMScheduler.step (with _threshold_sample)
   vs diffkern's one fused step, at (4,3,256,256) and (1,3,1024,1024);
4. the sdpa attention backend's NaN-row check vs torch SDPA alone.

    OMP_NUM_THREADS=1 python benchmarks/cpu_side_by_side.py --out benchmarks/results [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' released-layout configs


def _interleaved(fns, rounds):
    """Median seconds per callable, the callables run in turn `rounds` times after one warm-up each."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def patch_rows(rounds):
    import diffusers

    import diffkern

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(64, 128), layers_per_block=1, sample_size=32, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32,
                                  latent_channels=4).eval()
    x, t, text, z = torch.randn(2, 4, 32, 32), torch.tensor(500), torch.randn(2, 77, 64), torch.randn(1, 4, 32, 32)
    rows = []
    for name, model, fn in (("diffusers UNet (64,128), (2,4,32,32) + 77 tokens", unet, lambda: unet(x, t, text).sample),
                            ("diffusers VAE decode (32,64), (1,4,32,32)", vae, lambda: vae.decode(z).sample)):
        base, fast = [], []
        fn()
        for _ in range(rounds):
            t0 = time.perf_counter()
            ref = fn()
            base.append(time.perf_counter() - t0)
            diffkern.patch(model)
            t0 = time.perf_counter()
            out = fn()
            fast.append(time.perf_counter() - t0)
            diffkern.unpatch(model)
        b, f = statistics.median(base), statistics.median(fast)
        rows.append(dict(check="diffkern.patch", case=name, peer_ms=b * 1e3, diffkern_ms=f * 1e3, speedup=b / f,
                         max_abs_diff=(out - ref).abs().max().item()))
    return rows


def unet_rows(rounds):
    import diffusers

    from diffkern.models import from_diffusers
    from tests.models.test_unet_if import IF_I_XL
    from tests.models.test_unet_unclip import KARLO_DECODER

    cases = [
        ("IF-I layout (128,256,384,512), (1,3,64,64) + 77 T5 tokens",
         dict(IF_I_XL, block_out_channels=(128, 256, 384, 512), layers_per_block=1, cross_attention_dim=512,
              encoder_hid_dim=256, addition_embed_type_num_heads=4), 77, {}),
        ("Karlo decoder layout (64,128,192,256), (1,3,64,64) + 81 tokens",
         dict(KARLO_DECODER, block_out_channels=(64, 128, 192, 256), layers_per_block=1, cross_attention_dim=256),
         81, {"class_labels": torch.randn(1, 256), "attention_mask": torch.ones(1, 81, dtype=torch.bool)}),
    ]
    rows = []
    for name, cfg, tokens, kw in cases:
        torch.manual_seed(0)
        theirs = diffusers.UNet2DConditionModel(**cfg).eval()
        ours = from_diffusers(theirs)
        x, ctx, t = torch.randn(1, 3, 64, 64), torch.randn(1, tokens, 256), torch.tensor([500])
        with torch.inference_mode():
            med = _interleaved({"peer": lambda: theirs(x, t, ctx, **kw), "ours": lambda: ours(x, t, ctx, **kw)},
                               rounds)
            diff = (ours(x, t, ctx, **kw).sample - theirs(x, t, ctx, **kw).sample).abs().max().item()
        rows.append(dict(check="diffkern UNet vs diffusers UNet", case=name, peer_ms=med["peer"] * 1e3,
                         diffkern_ms=med["ours"] * 1e3, speedup=med["peer"] / med["ours"], max_abs_diff=diff))
    return rows


def if_update_rows(rounds):
    import diffusers

    from diffkern.bench import models_if

    rows = []
    for shape in models_if.UPDATE_SHAPES:
        case = SimpleNamespace(kind="if-update", shape=shape, config=models_if.IF_SCHEDULER, dtype=torch.float32)
        fns = models_if.callables(case, torch.device("cpu"), diffusers)
        with torch.inference_mode():
            med = _interleaved({"peer": fns["diffusers"], "ours": fns["diffkern"]}, rounds)
        rows.append(dict(check="IF update: CFG + learned range + dynamic thresholding + DDPM step", case=str(shape),
                         peer_ms=med["peer"] * 1e3, diffkern_ms=med["ours"] * 1e3, speedup=med["peer"] / med["ours"]))
    return rows


def sdpa_check_rows():
    from diffkern.bench.attention import sdpa_nan_check_cost

    lines = []
    sdpa_nan_check_cost(log=lines.append)
    return [dict(check="sdpa backend NaN-row check", case=line) for line in lines]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from diffkern.bench import harness

    env = harness.environment(torch.device("cpu"), harness.pin_cpu_allocator())
    env["command"] = "OMP_NUM_THREADS=1 python benchmarks/cpu_side_by_side.py " + " ".join(argv or sys.argv[1:])
    with open("/proc/loadavg") as f:
        env["load_average_at_start"] = f.read().split()[:3]
    rows = patch_rows(args.rounds) + unet_rows(args.rounds) + if_update_rows(args.rounds) + sdpa_check_rows()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu-side-by-side.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    md = ["# CPU side-by-side checks", "", f"Command: `{env['command']}`", ""]
    md += [f"- {k}: {v}" for k, v in env.items() if k != "command"]
    md += ["", "| check | case | peer ms | diffkern ms | speed-up | max abs diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "peer_ms" in r:
            diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
            md.append(f"| {r['check']} | {r['case']} | {r['peer_ms']:.1f} | {r['diffkern_ms']:.1f} | "
                      f"{r['speedup']:.2f}x | {diff} |")
    md += ["", "sdpa NaN-row check (torch SDPA alone vs the sdpa backend, best of interleaved calls):", ""]
    md += [f"    {r['case']}" for r in rows if "peer_ms" not in r]
    (out / "cpu-side-by-side.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
