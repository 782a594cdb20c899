"""attention benchmark: forward (and forward + backward on a GPU) TFLOP/s against the reference,
SDPA (default dispatch and each of its backends that runs), xformers and concat + SDPA for the prefix.

FLOPs counted: 4 * B * H * Sq * (Sp + Sk) * D for the forward (two matmuls), 2.5x that for
forward + backward (the usual FlashAttention accounting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffkern import ops
from diffkern.bench import harness
from diffkern.kernels import reference


@dataclass
class Case:
    name: str
    B: int
    H: int
    Sq: int
    Sk: int
    D: int
    Sp: int
    dtype: torch.dtype
    causal: bool = False


def cases(device, quick=False):
    if device.type == "cpu":  # small shapes only: CPU attention is for correctness, not the product
        shapes = [("sd15-self", 2, 8, 256, 256, 160, 0), ("sd15-cross", 2, 8, 256, 77, 160, 0),
                  ("sd15-self", 2, 8, 64, 64, 160, 0), ("glide-prefix", 2, 3, 256, 256, 64, 128)]
        return [Case(*s, torch.float32) for s in (shapes[:1] if quick else shapes)]
    shapes = []
    for s, d in ((4096, 40), (1024, 80), (256, 160), (64, 160)):
        shapes += [("sd15-self", 2, 8, s, s, d, 0), ("sd15-cross", 2, 8, s, 77, d, 0)]
    shapes += [("sd2-self", 2, 5, 9216, 9216, 64, 0), ("sd2-cross", 2, 5, 9216, 77, 64, 0),
               ("glide-prefix", 2, 3, 1024, 1024, 64, 128),
               ("synthetic", 2, 16, 4096, 4096, 128, 0), ("synthetic", 1, 16, 16384, 16384, 128, 0)]
    if quick:
        shapes = [shapes[0], shapes[-3], shapes[-2]]
    return [Case(*s, dt) for dt in (torch.float16, torch.bfloat16) for s in shapes]


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return {k: (lambda b=getattr(SDPBackend, v): sdpa_kernel(b)) for k, v in names.items() if hasattr(SDPBackend, v)}


def candidates(case, device):
    """[(name, forward fn, note)] for one case; each fn returns the output."""
    g = torch.Generator(device=device).manual_seed(0)
    t = lambda S: torch.randn(case.B, case.H, S, case.D, device=device, dtype=case.dtype, generator=g)  # noqa: E731
    q, k, v = t(case.Sq), t(case.Sk), t(case.Sk)
    prefix = (t(case.Sp), t(case.Sp)) if case.Sp else None
    kw = dict(causal=case.causal, kv_prefix=prefix)
    out = []
    scores_bytes = case.B * case.H * case.Sq * (case.Sk + case.Sp) * 4
    if scores_bytes < (4 << 30):
        out.append(("reference", lambda: reference.attention(q, k, v, **kw), "plain math, fp32 scores"))
    if device.type == "cpu" and not prefix:  # beside diffkern's sdpa backend: what its checks cost
        out.append(("torch-sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=case.causal), "torch SDPA called directly (no NaN check, no dispatch)"))
    if device.type == "cuda" and not prefix:
        for name, ctx in _sdpa_backends().items():
            out.append((f"sdpa[{name}]", _in_context(ctx, lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=case.causal)), "peer"))
    note = "peer: concat + SDPA" if prefix else "peer: torch SDPA, its own dispatch (+ NaN row check on CPU)"
    would_run = lambda n: ops.attention_backend(q, k, v, backend=n, **kw)  # noqa: E731
    for name in harness.kernel_backends("attention", device, would_run):
        out.append((name, (lambda n=name: ops.attention(q, k, v, backend=n, **kw)),
                    note if name == "sdpa" else ("peer" if name == "xformers" else "")))
    return out


def _in_context(ctx_factory, fn):
    def run():
        with ctx_factory():
            return fn()
    return run


def run(device, quick=False, compile_reference=True, log=print):
    rows = []
    for case in cases(device, quick):
        flops = 4 * case.B * case.H * case.Sq * (case.Sk + case.Sp) * case.D
        label = f"{case.name} ({case.B}, {case.H}, {case.Sq}, {case.Sk}, {case.D})" + (f" +{case.Sp}" if case.Sp else "")
        with torch.no_grad():
            cands = candidates(case, device)
            times = harness.timing.interleaved({n: fn for n, fn, _ in cands}, device,
                                               log=lambda m: log(f"{m} on {label}"))
        peers = [n for n in times if n.startswith("sdpa") or n in ("xformers", "torch-sdpa")]
        rows += harness.case_rows("attention", (case.B, case.H, case.Sq, case.Sk, case.D, case.Sp),
                                  (label, str(case.dtype)[6:], "causal" if case.causal else "-"), cands, times,
                                  peers, flops=flops)
        log(f"  {label} {str(case.dtype)[6:]}: " + ", ".join(f"{n} {t.median * 1e6:.0f}us" for n, t in times.items() if t))
    return rows


def targets(rows, device, copy_gbps):
    """Issue 3's forward targets on a GPU (triton against the best peer); none on CPU."""
    if device.type != "cuda":
        return []
    out = []
    for r in rows:
        if r.backend != "triton" or r.median_us != r.median_us:
            continue
        D = r.shape[4]
        need = 1.0 if D in (64, 128) else 1.2
        text, ok = harness.target(f"triton {r.case} {r.dtype} vs best peer", r.speedup_vs_best_peer, need, r)
        if r.shape[:5] == (2, 16, 4096, 4096, 128) and ok is not None:
            tf = r.extra["tflops"]
            text += f", {tf:.0f} TFLOP/s (target 450)"
            ok = ok and tf >= 450
        out.append((text, ok))
    return out


def sdpa_nan_check_cost(shapes=((2, 8, 1024, 77, 40), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160),
                                (2, 8, 256, 256, 160)), rounds=6, calls=15, log=print):
    """What the sdpa backend's NaN row check costs on CPU (diffkern.ops.attention._run_sdpa): torch SDPA
    alone against the backend, interleaved, best of rounds x calls on one thread (a shared machine's noise
    only ever adds time). Run: python -c "from diffkern.bench.attention import sdpa_nan_check_cost as f; f()"
    """
    import importlib
    import time

    attn = importlib.import_module("diffkern.ops.attention")
    torch.set_num_threads(1)

    def best(fn, c):
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            fn(c)
            ts.append(time.perf_counter() - t)
        return min(ts)

    def plain(c):
        return torch.nn.functional.scaled_dot_product_attention(c.q, c.k, c.v, scale=c.scale)

    def check(c):
        return bool(torch.isnan(c.q.sum() + c.k[:, :, :1].sum()))

    rows = []
    for B, H, Sq, Sk, D in shapes:
        q, k, v = (torch.randn(B, H, S, D) for S in (Sq, Sk, Sk))
        c = attn._check(q, k, v, None, False, None, None)
        t = {f: float("inf") for f in (plain, attn._run_sdpa, check)}
        for _ in range(rounds):
            for f in t:
                t[f] = min(t[f], best(f, c))
        rows.append(((B, H, Sq, Sk, D), t[plain] * 1e6, t[attn._run_sdpa] * 1e6, t[check] * 1e6))
        log(f"{rows[-1][0]}: torch SDPA {rows[-1][1]:.0f} us, sdpa backend {rows[-1][2]:.0f} us "
            f"({rows[-1][2] / rows[-1][1]:.3f}x), the check alone {rows[-1][3]:.0f} us "
            f"({100 * rows[-1][3] / rows[-1][1]:.1f}% of torch SDPA)")
    return rows
