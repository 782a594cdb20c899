"""Diagnostics for exception translation (see the top of csrc/bindings.cpp). Calls the extension with each bad input of tests/ops/test_group_norm.py::test_compiled_code_checks_its_inputs
in turn, printing before each call, so a crash names its case (run under python -X faulthandler)."""

import subprocess
import sys

import torch

from diffkern import _ext

for expr in ["_debug_throw_formatted(7)"]:
    code = f"import torch\nfrom diffkern import _ext\ntry:\n    _ext.extension().{expr}\nexcept Exception as e:\n    print(type(e).__name__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(f"{expr}: exit {res.returncode}, python saw {res.stdout.strip() or '-'}", flush=True)
# which C++ exception kinds survive translation into Python on this build (each in a subprocess)
for kind, name in enumerate(["pybind11::value_error", "c10::Error (TORCH_CHECK)", "std::runtime_error"]):
    code = f"from diffkern import _ext\ntry:\n    _ext.extension()._debug_throw({kind})\nexcept Exception as e:\n    print(type(e).__name__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(f"throw {name}: exit {res.returncode}, python saw {res.stdout.strip() or '-'}", flush=True)

ext = _ext.extension()
x = torch.randn(2, 8, 4, 4)
bad = {
    "num_groups=3": dict(x=x, num_groups=3),
    "num_groups=0": dict(x=x, num_groups=0),
    "1-D": dict(x=x.flatten(), num_groups=1),
    "int64": dict(x=x.to(torch.int64), num_groups=4),
    "weight shape": dict(x=x, num_groups=4, weight=torch.ones(7)),
    "weight dtype": dict(x=x, num_groups=4, weight=torch.ones(8, dtype=torch.float64)),
    "scale only": dict(x=x, num_groups=4, scale=torch.ones(2, 8)),
    "shift shape": dict(x=x, num_groups=4, scale=torch.ones(2, 8), shift=torch.ones(8)),
    "strided": dict(x=x[..., ::2], num_groups=4),
    "out shape": dict(x=x, num_groups=4, out=torch.empty(2, 8, 4, 5)),
}
ORDER = ["x", "num_groups", "weight", "bias", "scale", "shift", "eps", "activation", "out"]


def call(kw, positional):
    args = dict(weight=None, bias=None, scale=None, shift=None, eps=1e-5, activation=0, out=None)
    args.update(kw)
    if positional:
        return ext.group_norm_forward(*[args[k] for k in ORDER])
    return ext.group_norm_forward(**args)


mode = sys.argv[1] if len(sys.argv) > 1 else "both"
if mode == "both":  # positional in this process, keywords in a subprocess (it may crash)
    for positional in (True, False):
        res = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "pos" if positional else "kw"],
                             capture_output=True, text=True)
        print(f"== {'positional' if positional else 'keyword'} arguments: exit {res.returncode}")
        print(res.stdout.strip()[-1500:])
    sys.exit(0)
for name, kw in bad.items():
    print("calling:", name, flush=True)
    try:
        call(kw, mode == "pos")
        print("  NO ERROR", flush=True)
    except (RuntimeError, TypeError, ValueError) as e:
        print("  raised", type(e).__name__, str(e).splitlines()[0][:100], flush=True)
print("probe done")
