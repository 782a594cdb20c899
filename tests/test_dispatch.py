"""Backend choice: argument, context, environment variable, priority list; errors list reasons."""

import pytest
import torch

import diffkern
from diffkern import _ext
from diffkern.ops import group_norm_backend

X = torch.randn(2, 8, 4, 4)


def test_available_backends_on_this_machine():
    names = diffkern.ops.available_backends("group_norm")
    assert "reference" in names
    assert ("cpu" in names) == (_ext.extension() is not None)
    assert ("cuda" in names) == (torch.cuda.is_available() and bool(_ext.build_info().get("cuda")))
    with pytest.raises(ValueError, match="op_name"):
        diffkern.ops.available_backends("no_such_op")


def test_automatic_choice_is_the_compiled_cpu_kernel():
    assert _ext.extension() is not None, _ext.extension_error()
    assert group_norm_backend(X, 4) == "cpu"
    assert group_norm_backend(X.double(), 4) == "reference"  # the kernels take no float64


def test_argument_beats_context_beats_environment(monkeypatch):
    monkeypatch.setenv("DIFFKERN_BACKEND", "reference")
    assert group_norm_backend(X, 4) == "reference"
    with diffkern.use_backend("cpu"):
        assert group_norm_backend(X, 4) == "cpu"
        with diffkern.use_backend(group_norm="reference"):
            assert group_norm_backend(X, 4) == "reference"
        assert group_norm_backend(X, 4, backend="reference") == "reference"
    monkeypatch.setenv("DIFFKERN_BACKEND", "attention=sdpa,group_norm=reference")
    assert group_norm_backend(X, 4) == "reference"
    monkeypatch.setenv("DIFFKERN_BACKEND", "sdpa")  # a name this op lacks: ignored by it
    assert group_norm_backend(X, 4) == "cpu"


def test_explicit_backend_that_cannot_run_lists_reasons():
    with pytest.raises(ValueError, match=r"backend 'cuda'.*(device cpu not supported|GPU|CUDA)"):
        diffkern.ops.group_norm(X, 4, backend="cuda")
    with pytest.raises(ValueError, match="float64 not supported"):
        diffkern.ops.group_norm(X.double(), 4, backend="cpu")
    with pytest.raises(ValueError, match="no backend 'nope'"):
        diffkern.ops.group_norm(X, 4, backend="nope")
    with diffkern.use_backend(group_norm="nope"), pytest.raises(ValueError, match="use_backend"):
        diffkern.ops.group_norm(X, 4)


def test_environment_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("DIFFKERN_BACKEND", "group_norm=cpu")
    with pytest.raises(ValueError, match="DIFFKERN_BACKEND"):
        diffkern.ops.group_norm(X.double(), 4)


def test_no_capable_backend_lists_every_backend(monkeypatch):
    from diffkern import _dispatch

    fam = _dispatch.op_family("group_norm")
    monkeypatch.setitem(fam.priority, "cpu", ["cpu"])
    with pytest.raises(ValueError) as info:
        diffkern.ops.group_norm(X.double(), 4)
    msg = str(info.value)
    for name in ("cpu", "cuda", "triton", "reference"):
        assert name + ":" in msg


def test_use_backend_needs_a_name():
    with pytest.raises(ValueError):
        with diffkern.use_backend():
            pass
