"""Static sm_90a report of the Triton group_norm kernels at the SD 1.5, GLIDE and IF-I-XL GroupNorm
shapes (batch 1, 2, 8, 32; fp16 and fp32; contiguous and channels_last), without a GPU:

    python benchmarks/group_norm_static.py [--acts silu,gelu] [--out FILE]

The launcher itself runs on fake CUDA tensors of an H100 (132 SMs) through benchmarks/gpu_static.py's
recorder, so the configs are the ones `launch_config` picks; each distinct config is compiled by
Triton for GPUTarget("cuda", 90, 32) and ptxas -v gives registers / spills / shared memory. The
roofline column is the bandwidth floor: x read once + y written once (fp16) at 3.35 TB/s (H100 SXM).
"""

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)

import gpu_static as gs  # noqa: E402
import torch  # noqa: E402

from diffkern.kernels.triton import group_norm as tgn  # noqa: E402
from diffkern.ops import _group_norm_kernels as gk  # noqa: E402

SHAPES = {"SD 1.5": [(320, 64), (640, 32), (1280, 16), (1280, 8)],
          "GLIDE": [(192, 64), (384, 32), (576, 16), (768, 8)],
          "IF-I-XL": [(704, 64), (1408, 32), (2112, 16), (2816, 8)]}
BATCHES = (1, 2, 8, 32)
BW = 3.35e12
SMS = 132


def record(acts):
    launches, label = [], [""]
    with gs.recording(launches, "group_norm", label):
        for fam, shapes in SHAPES.items():
            for N in BATCHES:
                for C, H in shapes:
                    for cl in (False, True):
                        for dtype in (torch.float16, torch.float32):
                            for act in acts:
                                shape = (N, C, H, H)
                                stride = (C * H * H, 1, H * C, C) if cl else (C * H * H, H * H, H, 1)
                                x = torch.empty_strided(shape, stride, device="cuda", dtype=dtype)
                                w = torch.empty(C, device="cuda", dtype=dtype)
                                sc = torch.empty(N, C, device="cuda", dtype=dtype) if fam != "SD 1.5" else None
                                label[0] = f"{fam} {shape} {str(dtype)[6:]} {'cl' if cl else 'contig'} {act}"
                                gk.FORWARD_KERNELS["triton"](x, 32, w, w, sc, sc, 1e-5, act)
    return launches


def roofline_table():
    rows = ["| model | shape | MB moved (fp16 x + y) | floor at 3.35 TB/s (us) | 85% target (us) | "
            "plan contiguous (programs) | plan channels_last (programs) |", "|---|---|---|---|---|---|---|"]
    for fam, shapes in SHAPES.items():
        for N in BATCHES:
            for C, H in shapes:
                S = H * H
                b = 2 * N * C * S * 2
                cells = [fam, f"({N}, {C}, {H}, {H})", f"{b / 1e6:.2f}", f"{b / BW * 1e6:.2f}",
                         f"{b / BW / 0.85 * 1e6:.2f}"]
                for cl in (False, True):
                    cfg = tgn.launch_config(N, C, S, 32, 2, cl, SMS)
                    p = 1
                    for g in cfg["grid"]:
                        p *= g
                    extra = f" x{cfg['splits']}" if cfg["plan"] == "split" else ""
                    cells.append(f"{cfg['plan']}{extra} ({p})")
                rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", default="silu", help="comma-separated activations (silu, gelu, gelu_tanh, none)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "group_norm-triton-static-sm90a.md"))
    a = p.parse_args(argv)
    acts = [None if s == "none" else s for s in a.acts.split(",")]
    launches = record(acts)
    results = gs.compile_all(launches)
    agg = defaultdict(list)
    for r in results:
        agg[(r.kernel, r.num_warps)].append(r)
    lines = ["# Triton group_norm on sm_90a: registers, spills, shared memory (static, no GPU)", "",
             f"Command: `python benchmarks/group_norm_static.py --acts {a.acts}` (torch {torch.__version__}, "
             f"triton {__import__('triton').__version__}, ptxas from Triton). {len(launches)} launches, "
             f"{len(results)} distinct configs, {sum(1 for r in results if r.error)} compile errors, "
             f"{sum(1 for r in results if r.spills)} with spills.", "",
             "| kernel | warps | configs | registers | max spill (B) | shared (B) | blocks/SM |",
             "|---|---|---|---|---|---|---|"]
    for (k, w), rs in sorted(agg.items()):
        ok = [r for r in rs if not r.error]
        if not ok:
            lines.append(f"| {k} | {w} | {len(rs)} | error: {rs[0].error} | | | |")
            continue
        regs = [r.registers or 0 for r in ok]
        sm = [r.shared or 0 for r in ok]
        bl = [r.blocks_per_sm for r in ok]
        lines.append(f"| {k} | {w} | {len(rs)} | {min(regs)}-{max(regs)} | {max(r.spills or 0 for r in ok)} | "
                     f"{min(sm)}-{max(sm)} | {min(bl)}-{max(bl)} |")
    lines += ["", "## Per config", "", "| kernel | constexprs | warps | regs | spill B | smem B | cases (first) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.kernel} | {r.constexprs} | {r.num_warps} | {r.registers} | {r.spills} | {r.shared} | "
                     f"{r.cases[0]} (+{len(r.cases) - 1}) |" if not r.error else f"| {r.kernel} | {r.constexprs} | "
                     f"{r.num_warps} | error: {r.error} | | | |")
    lines += ["", "## Roofline expectation per shape (H100 SXM, 3.35 TB/s) and the plan launch_config picks", "",
              "Bytes: x read once + y written once, fp16 (fp32: twice the bytes and times). The resident plan reads "
              "x from DRAM once; split / rows read it a second time from L2 (chosen only for tensors <= 24 MB or "
              "fewer groups than SMs); looped re-reads each group right after its statistics (L2 reuse, the "
              "expectation to check on a GPU). No GPU timings here.", ""] + roofline_table()
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}: {len(results)} configs, {sum(1 for r in results if r.spills)} spill")


if __name__ == "__main__":
    main()
