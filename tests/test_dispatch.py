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


# ---------------------------------------------------------------------------------------------
# per-device dispatch tables (benchmarks/results/dispatch-<device>.json, written by the GPU suite)

import json  # noqa: E402

from diffkern import _dispatch  # noqa: E402


@pytest.fixture
def table_op(monkeypatch, tmp_path):
    """A throwaway op with two always-capable backends, safe order a > b on 'cuda', on a fake GPU whose
    tables are looked for in tmp_path only."""
    fam = _dispatch.OpFamily("table_test_op")
    for name in ("a", "b"):
        fam.register(_dispatch.Backend(name, lambda call, n=name: n, lambda: "", lambda call: []))
    fam.priority = {"cuda": ["a", "b"]}
    monkeypatch.setitem(_dispatch._OPS, fam.name, fam)
    monkeypatch.setattr(_dispatch, "_device_name", lambda device_type: "Fake GPU H9 80GB" if device_type == "cuda"
                        else None)
    monkeypatch.setenv(_dispatch.TABLE_ENV_VAR, str(tmp_path))
    _dispatch.reload_tables()
    yield fam, tmp_path
    _dispatch.reload_tables()


def _write_table(folder, ops, name="dispatch-fake-gpu-h9.json", **extra):
    (folder / name).write_text(json.dumps(dict({"format": 1, "device": "Fake GPU H9 80GB", "ops": ops}, **extra)))


def test_without_a_table_the_safe_choice_stays(table_op):
    fam, _ = table_op
    assert _dispatch.select(fam.name, object(), "cuda").name == "a"
    assert "no dispatch table for 'Fake GPU H9 80GB'" in _dispatch.dispatch_table_status()


def test_a_table_switches_the_choice_per_shape_class(table_op):
    fam, folder = table_op
    _write_table(folder, {fam.name: {"*": ["b"], "small": ["a"]}, "other_op": {"*": ["x"]}})
    assert _dispatch.select(fam.name, object(), "cuda").name == "b"  # the name's prefix file was found
    assert _dispatch.automatic_order(fam, object(), "cuda") == ["b", "a"]  # safe list follows as last resort
    fam.shape_class = lambda call: call
    assert _dispatch.select(fam.name, "small", "cuda").name == "a"
    assert _dispatch.select(fam.name, "large", "cuda").name == "b"  # unknown class: the "*" row
    assert "dispatch table for 'Fake GPU H9 80GB'" in _dispatch.dispatch_table_status()
    with diffkern.use_backend(table_test_op="a"):  # explicit requests still win
        assert _dispatch.select(fam.name, object(), "cuda").name == "a"


def test_a_table_naming_unknown_backends_skips_them(table_op):
    fam, folder = table_op
    _write_table(folder, {fam.name: {"*": ["flash9000", "b"]}})
    assert _dispatch.automatic_order(fam, None, "cuda") == ["b", "a"]


@pytest.mark.parametrize("content", ['{"format": 1, "ops": {"table_test_op": {"*": "b"}}}', "{not json",
                                     '{"format": 2, "ops": {}}', "[]"])
def test_a_malformed_table_keeps_the_safe_choice_with_a_note_in_info(table_op, monkeypatch, capsys, content):
    fam, folder = table_op
    (folder / "dispatch-fake-gpu-h9-80gb.json").write_text(content)
    assert _dispatch.select(fam.name, object(), "cuda").name == "a"
    from diffkern import info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the info page itself needs no GPU here
    data = info.collect()
    assert "malformed dispatch table, ignored (safe choices kept)" in data["dispatch_table"]
    info.main([])
    assert "malformed dispatch table" in capsys.readouterr().out


def test_tables_are_read_lazily_and_cached(table_op, monkeypatch):
    fam, folder = table_op
    _write_table(folder, {fam.name: {"*": ["b"]}})
    reads = []
    real = _dispatch.json.loads
    monkeypatch.setattr(_dispatch.json, "loads", lambda text: (reads.append(1), real(text))[1])
    for _ in range(3):
        assert _dispatch.select(fam.name, object(), "cuda").name == "b"
    assert len(reads) == 1


def test_the_environment_variable_comes_first_in_the_search_path(table_op):
    assert _dispatch.table_search_path()[0] == table_op[1]


def test_device_names_map_to_table_files():
    assert _dispatch.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert _dispatch._table_candidates("nvidia-h100-80gb-hbm3") == [
        "dispatch-nvidia-h100-80gb-hbm3.json", "dispatch-nvidia-h100-80gb.json", "dispatch-nvidia-h100.json"]
    assert _dispatch._table_candidates("nvidia-h200") == ["dispatch-nvidia-h200.json"]


def test_importing_diffkern_reads_no_table():
    import subprocess
    import sys

    code = ("import diffkern, diffkern.ops; from diffkern import _dispatch; "
            "print(_dispatch._load_table.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "0", out.stderr[-500:]
