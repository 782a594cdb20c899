"""The benchmark suite (the main job) runs end to end and writes its table, JSON and markdown."""

import json

import torch

from diffkern.bench import __main__ as bench
from diffkern.bench import group_norm, harness


def test_bench_quick_run_writes_results(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(harness, "time_cpu", lambda fn, min_run_time=0.5: (fn(), 1e-3)[1])  # smoke: no timing
    assert bench.main(["--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| case" in out and "reference" in out
    assert list(tmp_path.glob("attention-*.json"))
    (json_file,) = tmp_path.glob("group_norm-*.json")
    data = json.loads(json_file.read_text())
    assert {"date", "git_sha", "torch", "device", "command", "allocator"} <= set(data["environment"])
    backends = {r["backend"] for r in data["rows"]}
    assert {"reference", "cpu"} <= backends
    assert all(r["gbps"] > 0 for r in data["rows"] if r["gbps"] is not None)
    assert list(tmp_path.glob("group_norm-*.md"))


def test_cases_cover_the_issue_shapes():
    shapes = {c.shape for c in group_norm.cases(torch.device("cpu"))}
    assert set(group_norm.SD15) <= shapes and set(group_norm.GLIDE) <= shapes
    gpu = group_norm.cases(torch.device("cuda"))
    assert {str(c.dtype) for c in gpu} == {"torch.float16", "torch.bfloat16"}
    assert {c.layout for c in gpu} == {"contiguous", "channels_last"}
