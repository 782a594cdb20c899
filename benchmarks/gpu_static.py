"""Static GPU report for sm_90a (H100 / H200), without a GPU.

    python benchmarks/gpu_static.py [--ops attention group_norm ...] [--no-nvcc] [--out FILE]

1. Every Triton kernel config the dispatcher can launch at the benchmark suites' shapes is found by
   running the launchers themselves (diffkern/kernels/triton/*.py and the ops' runners that call them)
   on fake CUDA tensors (torch FakeTensorMode, an H100's 132 SMs): each `kernel[grid](...)` is recorded
   instead of launched, so the constexprs and num_warps / num_stages come from the launchers' own
   config functions, not from a copy here. Each distinct (kernel, signature, constexprs, warps, stages)
   is compiled for GPUTarget("cuda", 90, 32) by Triton's own compiler and binder; ptxas -v (Triton's)
   gives registers, spills and shared memory; nvdisasm the SASS, searched for Hopper's warpgroup MMA.
2. csrc/cuda/*.cu with `nvcc -arch=sm_90a -Xptxas -v` (no torch headers: compiles anywhere).
3. A roofline floor per benchmark row: max(bytes / bandwidth, FLOPs / peak) on an H100 SXM
   (3.35 TB/s, 989 TFLOP/s dense fp16) and an H200 (4.8 TB/s, same peak), so that a GPU run's
   times can be read against it at once.

Writes benchmarks/results/gpu-static-sm90a.md; the last line printed is
`sm_90a: N kernel configs compiled, M spill` (M = configs with spilled bytes).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ARCH = "sm_90a"
CAPABILITY = 90
SMS = 132                   # H100 SXM and H200 both have 132 SMs
DEVICES = {"H100 SXM": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}  # bytes/s, dense fp16 FLOP/s
# per SM on sm_90: registers, threads, resident blocks, shared memory per SM and per block (bytes)
SM_REGS, SM_THREADS, SM_BLOCKS, SM_SMEM, BLOCK_SMEM, RESERVED_SMEM = 65536, 2048, 32, 233472, 232448, 1024
OPS = ("attention", "group_norm", "guided_step", "sampler_update", "dynamic_threshold")
# attention flag sets: the default covers each of prefix / causal / bias on and off (and the dbias-writing
# backward); --all-variants compiles each flag alone too
ATTENTION_VARIANTS = ["plain", "prefix+causal+bias"]
ALL_ATTENTION_VARIANTS = ["plain", "prefix", "causal", "bias", "prefix+causal+bias"]


@dataclasses.dataclass
class Launch:
    kernel: object            # the JITFunction
    args: tuple
    kwargs: dict
    op: str
    case: str

    def key(self, sig, constexprs, options):
        return (self.kernel.fn.__qualname__, self.kernel.fn.__module__, tuple(sorted(sig.items())),
                tuple(sorted((str(k), str(v)) for k, v in constexprs.items())), options.num_warps, options.num_stages)


@dataclasses.dataclass
class Result:
    kernel: str
    op: str
    cases: list
    constexprs: dict
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    blocks_per_sm: int | None = None
    occupancy: float | None = None
    wgmma: bool | None = None
    mma: str = ""
    error: str = ""
    numbers_note: str = ""
    seconds: float = 0.0
    signature: str = ""

    @property
    def spills(self):
        return (self.spill_stores or 0) + (self.spill_loads or 0)


# ---------------------------------------------------------------------------------------------
# recording launches on fake CUDA tensors


@contextlib.contextmanager
def recording(launches, op, case_label):
    """Inside: Triton launches are recorded into `launches`, not run; CUDA looks present (132 SMs)."""
    import triton.runtime.jit as jit
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffkern.ops import _backends

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, op, case_label[0]))

    props = SimpleNamespace(multi_processor_count=SMS, name="sm_90a (static)", major=9, minor=0,
                            total_memory=80 << 30)
    real_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):  # torch.tensor(..., device="cuda") would allocate for real
        t = real_tensor(data, *args, **kwargs)
        return t if device is None else t.to(device)

    saved = (jit.JITFunction.run, torch.cuda.get_device_properties, torch.cuda.is_available,
             _backends._triton_unavailable_for, torch.tensor, torch.Tensor.__getitem__)
    torch.tensor = tensor
    torch.Tensor.__getitem__ = _basic_getitem(torch.Tensor.__getitem__)
    jit.JITFunction.run = record
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.is_available = lambda: True
    _backends._triton_unavailable_for = lambda interpret: ""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        (jit.JITFunction.run, torch.cuda.get_device_properties, torch.cuda.is_available,
         _backends._triton_unavailable_for, torch.tensor, torch.Tensor.__getitem__) = saved


def _basic_getitem(real):
    """Tensor indexing by ints / slices / Ellipsis as narrow + select (a fake CUDA tensor's Python indexing
    path asks for a CUDA device guard, which a CPU-only torch does not have); other indices as before."""

    def getitem(t, idx):
        items = idx if isinstance(idx, tuple) else (idx,)
        if t.device.type != "cuda" or not all(isinstance(i, (int, slice)) or i is Ellipsis for i in items):
            return real(t, idx)
        if Ellipsis in items:
            k = items.index(Ellipsis)
            items = items[:k] + (slice(None),) * (t.dim() - len(items) + 1) + items[k + 1:]
        dim = 0
        for i in items:
            if isinstance(i, int):
                t = t.select(dim, i)
                continue
            start, stop, step = i.indices(t.shape[dim])
            if step != 1:
                return real(t, idx)
            t = t.narrow(dim, start, max(0, stop - start))
            dim += 1
        return t

    return getitem


_QUICK = {"on": False, "first": None}


@contextlib.contextmanager
def _quick_mode(on, label):
    _QUICK.update(on=on, first=None, label=label)
    try:
        yield
    finally:
        _QUICK.update(on=False, first=None)


def _cuda(*shape, dtype=torch.float16, memory_format=torch.contiguous_format):
    """A fake CUDA tensor. In quick mode the collector stops when its second case (label) starts (every
    collector's first case is float16)."""
    if _QUICK["on"]:
        if _QUICK["first"] is None:
            _QUICK["first"] = _QUICK["label"][0]
        elif _QUICK["label"][0] != _QUICK["first"]:
            raise _Quick()
    return torch.empty(shape, device="cuda", dtype=dtype, memory_format=memory_format)


def attention_launches(launches, label):
    """The attention suite's GPU cases (head dims 40, 80, 160, 64, 128), forward and backward, each with
    and without prefix / causal / bias (float, and the dbias-writing backward)."""
    from diffkern.bench import attention as suite
    from diffkern.kernels.triton import attention as ka

    seen = set()
    for case in suite.cases(torch.device("cuda")):
        for variant in ATTENTION_VARIANTS:
            key = (case.D, case.dtype, variant)
            if key in seen:
                continue
            seen.add(key)
            label[0] = f"attention d={case.D} {str(case.dtype)[6:]} {variant}"
            B, H, Sq, Sk, D = 1, 2, 256, 256, case.D  # configs depend on D and dtype only; grid on sizes
            q, k, v, do = (_cuda(B, H, S, D, dtype=case.dtype) for S in (Sq, Sk, Sk, Sq))
            kp = vp = None
            Sp = 0
            if "prefix" in variant:
                Sp = 77
                kp, vp = _cuda(B, H, Sp, D, dtype=case.dtype), _cuda(B, H, Sp, D, dtype=case.dtype)
            bias = _cuda(B, H, Sq, Sp + Sk, dtype=case.dtype) if "bias" in variant else None
            causal = "causal" in variant
            out, lse = ka.attention_forward(q, k, v, kp, vp, bias, causal, D ** -0.5)
            ka.attention_backward(do, q, k, v, kp, vp, bias, causal, D ** -0.5, out, lse,
                                  need_dbias=bias is not None)


def group_norm_launches(launches, label):
    """The group_norm suite's GPU cases (SD 1.5 and GLIDE shapes at batch 2 and 32, both memory formats,
    GLIDE's with scale-shift), through the op's Triton runner."""
    from diffkern.bench import group_norm as suite
    from diffkern.ops import _group_norm_kernels as gk

    for case in suite.cases(torch.device("cuda")):
        label[0] = f"group_norm {case.name} {case.shape} {str(case.dtype)[6:]} {case.layout}"
        N, C = case.shape[:2]
        x = _cuda(*case.shape, dtype=case.dtype, memory_format=torch.channels_last if case.layout == "channels_last"
                  else torch.contiguous_format)
        w, b = _cuda(C, dtype=case.dtype), _cuda(C, dtype=case.dtype)
        sc = sh = None
        if case.scale_shift:
            sc, sh = _cuda(N, C, dtype=case.dtype), _cuda(N, C, dtype=case.dtype)
        gk.FORWARD_KERNELS["triton"](x, suite.GROUPS, w, b, sc, sh, 1e-5, "silu")


def guided_step_launches(launches, label):
    """The guided_step suite's GPU calls (CFG + dynamic thresholding, noise given or drawn in the kernel:
    the stats pass and the update pass each), through the op."""
    from diffkern import ops
    from diffkern.bench import guided_step as suite

    for case in suite.cases(torch.device("cuda")):
        for seeded in (False, True):
            label[0] = f"guided_step {case.name} {case.shape} {str(case.dtype)[6:]} {'seeded' if seeded else 'noise'}"
            B = case.shape[0]
            x, m, u = (_cuda(*case.shape, dtype=case.dtype) for _ in range(3))
            coeffs = _cuda(B, 6, dtype=torch.float32)
            kw = dict(uncond_output=u, guidance_scale=suite.GUIDANCE, clip="dynamic",
                      dynamic_percentile=suite.PERCENTILE, dynamic_max_value=suite.MAX_VALUE, backend="triton")
            kw.update(noise_seed=1234) if seeded else kw.update(noise=_cuda(*case.shape, dtype=case.dtype))
            ops.guided_step(x, m, coeffs, **kw)


def sampler_update_launches(launches, label):
    """sampler_update at the schedulers suite's shapes: 0 to 6 history slots, with and without the aux
    output, with CFG and noise, no clipping (the schedulers' calls)."""
    from diffkern import ops
    from diffkern.bench import schedulers as suite

    for name, shape in suite.SHAPES:
        for dtype in (torch.float16, torch.bfloat16):
            for H in range(7):
                for aux in (False, True):
                    for clip in ("none",):
                        label[0] = f"sampler_update {name} {shape} {str(dtype)[6:]} H={H} aux={aux} clip={clip}"
                        B = shape[0]
                        x, m, u, noise = (_cuda(*shape, dtype=dtype) for _ in range(4))
                        hist = tuple(_cuda(*shape, dtype=dtype) for _ in range(H))
                        coeffs = _cuda(B, 5 + H + (2 + H if aux else 0), dtype=torch.float32)
                        ops.sampler_update(x, m, coeffs, hist, uncond_output=u, guidance_scale=7.5, clip=clip,
                                           noise=noise, aux=aux, backend="triton")


def dynamic_threshold_launches(launches, label):
    from diffkern import ops
    from diffkern.bench import dynamic_threshold as suite

    for case in suite.cases(torch.device("cuda")):
        label[0] = f"dynamic_threshold {case.shape} {str(case.dtype)[6:]}"
        ops.dynamic_threshold(_cuda(*case.shape, dtype=case.dtype), suite.PERCENTILE, suite.MAX_VALUE,
                              backend="triton")


COLLECTORS = {"attention": attention_launches, "group_norm": group_norm_launches,
              "guided_step": guided_step_launches, "sampler_update": sampler_update_launches,
              "dynamic_threshold": dynamic_threshold_launches}


class _Quick(Exception):
    """Raised after a collector's first case in quick mode."""


def collect_launches(ops=OPS, quick=False):
    """[Launch] for the ops, plus {op: error} for collectors that failed (named, never skipped silently).
    quick: each collector stops after its first case's launches."""
    import diffkern  # noqa: F401  (registers the ops before the fake mode)

    launches, errors = [], {}
    for op in ops:
        label = [op]
        try:
            with recording(launches, op, label), _quick_mode(quick, label):
                COLLECTORS[op](launches, label)
        except _Quick:
            pass
        except Exception as e:  # noqa: BLE001  (reported with the case that failed)
            errors[op] = f"{label[0]}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return launches, errors


# ---------------------------------------------------------------------------------------------
# compiling with Triton for sm_90a


class _FakeTensorArg:
    """What Triton's binder reads of a tensor argument: its dtype and (for alignment) its address."""

    def __init__(self, t):
        self.dtype = t.dtype

    @staticmethod
    def data_ptr():
        return 1 << 20  # 16-byte aligned, as every tensor from the caching allocator is


def _binder_inputs(launch):
    def conv(a):
        return _FakeTensorArg(a) if isinstance(a, torch.Tensor) else a

    return tuple(conv(a) for a in launch.args), {k: conv(v) for k, v in launch.kwargs.items()}


def specialise(launch, backend):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT computes them for this launch."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    args, kwargs = _binder_inputs(launch)
    kwargs = dict(kwargs, debug=False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def ptxas_report(ptx, workdir):
    """{registers, spill_stores, spill_loads, shared} from Triton's ptxas -v on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(CAPABILITY).path
    src = Path(workdir) / "k.ptx"
    src.write_text(ptx)
    out = subprocess.run([ptxas, "-v", f"--gpu-name={ARCH}", str(src), "-o", str(Path(workdir) / "k.cubin")],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr[-500:]}")
    return parse_ptxas(out.stderr)[-1] if parse_ptxas(out.stderr) else {}


def parse_ptxas(text):
    """Per entry function in ptxas -v output: {name, registers, spill_stores, spill_loads, shared}."""
    out, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = {"name": m.group(1), "registers": None, "spill_stores": 0, "spill_loads": 0, "shared": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill_stores"], cur["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur["shared"] = int(m.group(1))
    return out


def occupancy(registers, shared, num_warps):
    """(resident blocks per SM, fraction of the SM's 64 warps) on sm_90 for one config."""
    threads = 32 * num_warps
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = SM_REGS // (regs_per_warp * num_warps)
    by_threads = SM_THREADS // threads
    by_smem = SM_SMEM // (shared + RESERVED_SMEM) if shared else SM_BLOCKS
    if shared > BLOCK_SMEM:
        by_smem = 0
    blocks = max(0, min(SM_BLOCKS, by_regs, by_threads, by_smem))
    return blocks, blocks * num_warps / (SM_THREADS // 32)


def sass_mma(cubin_bytes, workdir):
    """('HGMMA', True) when the SASS has warpgroup MMA, ('HMMA', False) for mma.sync only, ('', None)
    when nvdisasm is missing."""
    from triton import knobs

    try:
        nvdisasm = knobs.nvidia.nvdisasm.path
    except Exception:  # noqa: BLE001
        return "", None
    path = Path(workdir) / "k.cubin"
    path.write_bytes(cubin_bytes)
    sass = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, timeout=600).stdout
    kinds = [k for k in ("HGMMA", "HMMA", "IMMA") if re.search(rf"\b{k}\b", sass)]
    return "/".join(kinds), "HGMMA" in kinds


def _short_error(e):
    """The informative part of a compile error: Triton's CompilationError holds the source position, an
    excerpt of the kernel, and the message on its last line."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    where = next((line for line in lines if re.match(r"at \d+:\d+:", line)), "")
    code = lines[-3].strip() if len(lines) >= 3 and where else ""
    return f"{type(e).__name__} {where} `{code[:90]}`: {' '.join(lines[-1].split())[:260]}" if lines else repr(e)


def compile_all(launches, log=print):
    """[Result] for each distinct config among the launches (compiled once, cases merged)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", CAPABILITY, 32)
    backend = make_backend(target)
    results, by_key = [], {}
    with tempfile.TemporaryDirectory() as work:
        for launch in launches:
            name = launch.kernel.fn.__name__
            try:
                sig, constexprs, attrs, options = specialise(launch, backend)
            except Exception as e:  # noqa: BLE001
                results.append(Result(name, launch.op, [launch.case], {}, launch.kwargs.get("num_warps", 4),
                                      launch.kwargs.get("num_stages", 3), error=f"binder: {type(e).__name__}: {e}"))
                continue
            key = launch.key(sig, constexprs, options)
            if key in by_key:
                by_key[key].cases.append(launch.case)
                continue
            named = {launch.kernel.arg_names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
            named = {k: v for k, v in named.items() if k in launch.kwargs}  # the launcher's constexprs, not specialised ints
            r = Result(name, launch.op, [launch.case], named, options.num_warps, options.num_stages,
                       signature=",".join(sorted({v for v in sig.values() if v.startswith("*")})))
            by_key[key] = r
            results.append(r)
            t0 = time.perf_counter()
            try:
                src = ASTSource(launch.kernel, sig, constexprs, attrs)
                try:
                    ck = triton.compile(src, target=target, options=options.__dict__)
                except Exception as e:  # noqa: BLE001
                    if "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS" not in str(e):
                        raise
                    # fails as written (reported); compiled again with the escape hatch for the numbers
                    r.error = _short_error(e)
                    from triton import knobs

                    with knobs.compilation.scope():
                        knobs.compilation.allow_non_constexpr_globals = True
                        ck = triton.compile(ASTSource(launch.kernel, sig, constexprs, attrs), target=target,
                                            options=options.__dict__)
                    r.numbers_note = "numbers with TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1"
                rep = ptxas_report(ck.asm["ptx"], work)
                r.registers, r.spill_stores, r.spill_loads = rep.get("registers"), rep.get("spill_stores"), \
                    rep.get("spill_loads")
                r.shared = ck.metadata.shared
                r.blocks_per_sm, r.occupancy = occupancy(r.registers or 0, r.shared or 0, r.num_warps)
                r.mma, r.wgmma = sass_mma(ck.asm["cubin"], work)
            except Exception as e:  # noqa: BLE001  (reported per config)
                r.error = _short_error(e)
            r.seconds = time.perf_counter() - t0
            log(f"  {r.kernel} {r.signature} {r.constexprs} warps={r.num_warps} stages={r.num_stages}: "
                + (f"FAILED {r.error}" if r.error and r.registers is None else
                   ("(FAILS AS WRITTEN) " if r.error else "") + f"{r.registers} regs, {r.spills} B spill, {r.shared} B smem, "
                   f"{r.blocks_per_sm} blocks/SM ({100 * r.occupancy:.0f}%), {r.mma or 'no MMA'}")
                + f" [{r.seconds:.1f} s]")
    return results


# ---------------------------------------------------------------------------------------------
# csrc/cuda with nvcc


def nvcc_reports(log=print):
    """[(file, {name, registers, spill_stores, spill_loads, shared})] or a reason string."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "nvcc not found"
    out = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        t0 = time.perf_counter()
        # -gencode, not -arch=sm_90a: the shorthand also runs a plain sm_90 pass (device notes, HOPPER.md)
        res = subprocess.run([nvcc, "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-Xptxas", "-v", "-c", str(cu), "-o",
                              os.devnull], capture_output=True, text=True, timeout=900, cwd=ROOT)
        if res.returncode != 0:
            out.append((cu.name, {"name": "(compile failed)", "error": res.stderr[-400:]}))
            continue
        entries = parse_ptxas(res.stderr)
        for e in entries:
            e["name"] = _demangle(e["name"])
            out.append((cu.name, e))
        log(f"  nvcc {cu.name}: {len(entries)} kernels [{time.perf_counter() - t0:.1f} s]")
    return out


def _demangle(name):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return name
    return subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name


# ---------------------------------------------------------------------------------------------
# roofline floors per benchmark row


def roofline_rows():
    """[(suite, case, dtype, bytes, flops)] for the GPU benchmark rows, counted as the suites count them."""
    from diffkern.bench import attention, dynamic_threshold, group_norm, guided_step

    cuda = torch.device("cuda")
    rows = []
    for c in group_norm.cases(cuda):
        n = 1
        for s in c.shape:
            n *= s
        rows.append(("group_norm", f"{c.name} {c.shape} {c.layout}", str(c.dtype)[6:], 2 * n * 2, 0))
    for c in attention.cases(cuda):
        flops = 4 * c.B * c.H * c.Sq * (c.Sk + c.Sp) * c.D
        nbytes = 2 * c.B * c.H * c.D * (2 * c.Sq + 2 * (c.Sk + c.Sp))
        label = f"{c.name} ({c.B}, {c.H}, {c.Sq}, {c.Sk}, {c.D})" + (f" +{c.Sp}" if c.Sp else "")
        rows.append(("attention fwd", label, str(c.dtype)[6:], nbytes, flops))
        rows.append(("attention fwd+bwd", label, str(c.dtype)[6:], 3 * nbytes, int(2.5 * flops)))
    for c in guided_step.cases(cuda):
        n = 1
        for s in c.shape:
            n *= s
        rows.append(("guided_step", f"{c.name} {c.shape}", str(c.dtype)[6:], 6 * n * 2, 0))
    for c in dynamic_threshold.cases(cuda):
        n = 1
        for s in c.shape:
            n *= s
        rows.append(("dynamic_threshold", f"{c.name} {c.shape}", str(c.dtype)[6:], 2 * n * 2, 0))
    return rows


def compare(bench_paths):
    """Markdown: each measured GPU row of diffkern.bench JSON against its roofline floor on the device the
    JSON names (H200 if its name says so, else H100 SXM); bytes and FLOPs recovered from the row's own
    GB/s or TFLOP/s (the suites' explicit counts)."""
    md = ["| suite | case | dtype | backend | measured us | floor us | % of roofline | spread |",
          "|---|---|---|---|---|---|---|---|"]
    for path in bench_paths:
        data = json.loads(Path(path).read_text())
        name = str(data.get("environment", {}).get("device", ""))
        dev = "H200" if "H200" in name.upper() else "H100 SXM"
        for r in data.get("rows", []):
            t = r.get("median_us")
            if not t or t != t:
                continue
            nbytes = (r.get("gbps") or 0) * 1e9 * t * 1e-6
            flops = ((r.get("extra") or {}).get("tflops") or 0) * 1e12 * t * 1e-6
            if not nbytes and not flops:
                continue
            floor = floor_us(nbytes, flops, dev)
            spread = r.get("spread")
            md.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['backend']} | {t:.1f} | {floor:.1f} | "
                      f"{100 * floor / t:.0f}% ({dev}) | {'' if spread is None else f'{100 * spread:.0f}%'} |")
    return "\n".join(md) + "\n"


def floor_us(nbytes, flops, device):
    bw, peak = DEVICES[device]
    return max(nbytes / bw, flops / peak) * 1e6


# ---------------------------------------------------------------------------------------------
# report


def markdown(results, errors, nvcc, roof, command):
    import triton

    ok = [r for r in results if not r.error]
    spilled = [r for r in results if r.registers is not None and r.spills]
    md = [f"# Static GPU report: {ARCH} (H100 / H200), no GPU needed", "",
          f"Command: `{command}`; triton {triton.__version__}, torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}.", "",
          f"Triton kernel configs the dispatcher launches at the benchmark suites' shapes, recorded from the "
          f"launchers on fake CUDA tensors ({SMS} SMs) and compiled by Triton for GPUTarget('cuda', "
          f"{CAPABILITY}, 32); registers and spills from Triton's ptxas -v, MMA kind from nvdisasm. "
          f"Occupancy: resident blocks per SM from registers (64K), threads (2048) and shared memory "
          f"(228 KB), as a fraction of the SM's 64 warps.", "",
          f"**{len(ok)} configs compiled, {len(spilled)} spill, "
          f"{len([r for r in results if r.error])} failed**" + (f"; collectors failed: {errors}" if errors else ""),
          "", "| op | kernel | pointers | constexprs | warps | stages | regs | spill B (st/ld) | smem B | blocks/SM | occupancy "
          "| MMA | cases | error |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.op, r.kernel, str(r.constexprs))):
        cx = ", ".join(f"{k}={v}" for k, v in r.constexprs.items())
        md.append(f"| {r.op} | {r.kernel} | {r.signature} | {cx} | {r.num_warps} | {r.num_stages} | {r.registers or ''} | "
                  f"{'' if r.spill_stores is None else f'{r.spill_stores}/{r.spill_loads}'} | "
                  f"{'' if r.shared is None else r.shared} | {'' if r.blocks_per_sm is None else r.blocks_per_sm} | "
                  f"{'' if r.occupancy is None else f'{100 * r.occupancy:.0f}%'} | {r.mma} | "
                  f"{len(r.cases)}: {r.cases[0]} | {r.error[:300]}{' (' + r.numbers_note + ')' if r.numbers_note else ''} |")
    attn = [r for r in ok if r.op == "attention" and r.kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")]
    if attn:
        md += ["", f"Warpgroup MMA (HGMMA) in the attention kernels: {sum(1 for r in attn if r.wgmma)} of "
               f"{len(attn)} configs (the rest use {', '.join(sorted({r.mma or 'no MMA' for r in attn if not r.wgmma})) or '-'})."]
    md += ["", "## csrc/cuda (nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -Xptxas -v)", ""]
    if isinstance(nvcc, str):
        md.append(f"not compiled: {nvcc}")
    else:
        md += ["| file | kernel | regs | spill B (st/ld) | smem B |", "|---|---|---|---|---|"]
        for f, e in nvcc:
            md.append(f"| {f} | `{e['name'][:110]}` | {e.get('registers', '')} | "
                      f"{e.get('spill_stores', '')}/{e.get('spill_loads', '')} | {e.get('shared', '')} |")
    md += ["", "## Roofline floors per benchmark row", "",
           "max(bytes / bandwidth, FLOPs / peak): H100 SXM 3.35 TB/s, 989 TFLOP/s dense fp16; H200 4.8 TB/s. "
           "Bytes as the suites count them (each input read once, each output written once; attention: q, k, v, "
           "o, and for the backward 3x that; FLOPs 4 B H Sq Sk D forward, 2.5x with the backward). A measured "
           "time divided by the floor says how far a kernel is from the device's limit.", "",
           "| suite | case | dtype | MB | GFLOP | H100 floor us | H200 floor us |", "|---|---|---|---|---|---|---|"]
    for suite, case, dtype, nbytes, flops in roof:
        md.append(f"| {suite} | {case} | {dtype} | {nbytes / 1e6:.1f} | {flops / 1e9:.1f} | "
                  f"{floor_us(nbytes, flops, 'H100 SXM'):.1f} | {floor_us(nbytes, flops, 'H200'):.1f} |")
    return "\n".join(md) + "\n"


def _prepare_environment():
    """For a compiling run (this process only, before Triton or the kernels are imported)."""
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JITFunctions, not the interpreter's
    # a fresh cache: Triton's cache key does not include TRITON_ALLOW_NON_CONSTEXPR_GLOBALS, so a kernel compiled
    # with that escape hatch (compile_all) would later load from the cache as if it compiled as written
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffkern-gpu-static-")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], True)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--no-nvcc", action="store_true", help="skip csrc/cuda")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-static-sm90a.md"))
    p.add_argument("--json", default=None, help="also write the per-config results as JSON here")
    p.add_argument("--quick", action="store_true", help="each collector's first case only (tests)")
    p.add_argument("--all-variants", action="store_true", help="attention: each of prefix / causal / bias alone too")
    p.add_argument("--compare", nargs="+", default=None, metavar="BENCH_JSON",
                   help="no compiling: measured GPU rows against their roofline floors, written to --out")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.compare:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Measured against the roofline floors\n\n" + compare(args.compare))
        print(f"wrote {args.out}")
        return 0
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_static: run it in its own process (TRITON_INTERPRET is set and Triton is imported)")
    _prepare_environment()
    if args.all_variants:
        ATTENTION_VARIANTS[:] = ALL_ATTENTION_VARIANTS
    launches, errors = collect_launches(args.ops, quick=args.quick)
    print(f"{len(launches)} launches recorded; compiling the distinct configs for {ARCH}")
    for op, why in errors.items():
        print(f"  COLLECTOR FAILED {op}: {why}")
    results = compile_all(launches)
    nvcc = "skipped (--no-nvcc)" if args.no_nvcc else nvcc_reports()
    roof = roofline_rows()
    command = "python benchmarks/gpu_static.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(results, errors, nvcc, roof, command.strip()))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=str))
    ok = [r for r in results if not r.error]
    spilled = [r for r in results if r.registers is not None and r.spills]
    for r in spilled:
        print(f"SPILL: {r.op} {r.kernel} {r.constexprs} num_warps={r.num_warps} num_stages={r.num_stages}: "
              f"{r.spill_stores} B stores / {r.spill_loads} B loads, {r.registers} regs ({r.cases[0]})")
    for r in results:
        if r.error:
            print(f"FAILED: {r.op} {r.kernel} {r.constexprs} num_warps={r.num_warps}: {r.error[:300]}")
    if not isinstance(nvcc, str):
        for f, e in nvcc:
            if e.get("error") or e.get("spill_stores") or e.get("spill_loads"):
                print(f"nvcc {f} {e['name'][:100]}: {e.get('error') or 'spills'}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    print(f"{ARCH}: {len(ok)} kernel configs compiled, {len(spilled)} spill")
    return 1 if errors or any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
