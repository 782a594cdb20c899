"""Availability checks and per-call reasons shared by the op families' backend tables."""

from __future__ import annotations

import importlib.util
import os

import torch

from diffkern import _ext


def dtype_reasons(t, dtypes):
    return [] if t.dtype in dtypes else [f"dtype {t.dtype} not supported (takes {list(dtypes)})"]


def device_reasons(t, device_types):
    d = t.device.type
    return [] if d in device_types else [f"device {d} not supported (takes {list(device_types)})"]


def tensor_reasons(t, device_types, dtypes):
    """Why a backend cannot take tensor t: its device (device_types None: any) and its dtype."""
    return (device_reasons(t, device_types) if device_types else []) + dtype_reasons(t, dtypes)


def takes(field, device_types, dtypes):
    """A Backend `reasons` function for backends limited by the device and dtype of call.<field>."""
    return lambda call: tensor_reasons(getattr(call, field), device_types, dtypes)


def triton_device_types():
    """Devices the Triton backends take: CUDA, plus CPU under TRITON_INTERPRET=1 (tests)."""
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def triton_unavailable():
    return _triton_unavailable_for(os.environ.get("TRITON_INTERPRET") == "1")


@_ext.cached  # fixed for the life of the process, per interpreter setting
def _triton_unavailable_for(interpret):
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and not interpret:
        return "no CUDA GPU visible (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"
    return ""


def extension_unavailable(symbol, need_cuda=False):
    """A cached () -> reason check: the compiled extension is loaded, has `symbol`, and (need_cuda)
    was built with CUDA kernels and sees a GPU."""

    @_ext.cached
    def why():
        ext = _ext.extension()
        if ext is None:
            return _ext.extension_error()
        if not hasattr(ext, symbol):
            return f"diffkern._C was built without {symbol} (rebuild: make setup)"
        if need_cuda and not _ext.build_info().get("cuda"):
            return "diffkern._C was built without CUDA kernels"
        if need_cuda and not torch.cuda.is_available():
            return "no CUDA GPU visible"
        return ""

    return why
