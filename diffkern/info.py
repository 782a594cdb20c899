"""`python -m diffkern.info`: versions, device, how the extension was built, usable backends per op."""

import json
import os
import platform
import sys

import torch

from diffkern import _dispatch, _ext


def collect():
    """Everything `python -m diffkern.info` prints, as a dict."""
    import diffkern  # noqa: F401  (registers the ops)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "diffkern": diffkern.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "DIFFKERN_BACKEND": os.environ.get(_dispatch.ENV_VAR),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability_torch": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "dispatch_table": _dispatch.dispatch_table_status("cuda"),
        "extension": _ext.build_info() or {"built": False, "error": _ext.extension_error()},
        "ops": {},
    }
    for op in _dispatch.registered_ops():
        fam = _dispatch.op_family(op)
        info["ops"][op] = {
            "usable": _dispatch.available_backends(op),
            "unusable": _dispatch.unavailable_reasons(op),
            "priority": fam.priority,
        }
        if torch.cuda.is_available():  # the order a GPU call tries: the device's table (if any), then the safe list
            info["ops"][op]["automatic_cuda"] = _dispatch.automatic_order(fam, None, "cuda")
    return info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "ops":
            continue
        print(f"{key:22s} {value}")
    for op, d in info["ops"].items():
        print(f"\nop {op}")
        print(f"  usable backends      {', '.join(d['usable'])}")
        for name, why in d["unusable"].items():
            print(f"  not usable: {name:9s} {why}")
        for dev, order in d["priority"].items():
            print(f"  automatic on {dev:6s}  {' > '.join(order)}")
        if "automatic_cuda" in d and d["automatic_cuda"] != d["priority"].get("cuda"):
            print(f"  with the table, cuda  {' > '.join(d['automatic_cuda'])}")


if __name__ == "__main__":
    main()
