"""Calls the extension with each bad input of tests/ops/test_group_norm.py::test_compiled_code_checks_its_inputs
in turn, printing before each call, so a crash names its case (run under python -X faulthandler)."""

import torch

from diffkern import _ext

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
for name, kw in bad.items():
    args = dict(weight=None, bias=None, scale=None, shift=None, eps=1e-5, silu=False)
    args.update(kw)
    print("calling:", name, flush=True)
    try:
        ext.group_norm_forward(**args)
        print("  NO ERROR", flush=True)
    except (RuntimeError, TypeError, ValueError) as e:
        print("  raised", type(e).__name__, str(e).splitlines()[0][:100], flush=True)
print("probe done")
