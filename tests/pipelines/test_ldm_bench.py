"""`python -m diffkern.bench.models_ldm` runs end to end on tiny configs (every candidate once, no timing)
and writes its JSON / markdown; the candidates compute the same outputs."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffkern.bench import models_ldm, timing  # noqa: E402

TINY_XL = dict(models_ldm.SDXL_CPU, block_out_channels=(32, 32, 64), attention_head_dim=(1, 1, 2),
               transformer_layers_per_block=(1, 1, 1), cross_attention_dim=128, addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=64 + 6 * 8)


def test_runs_on_tiny_configs_and_candidates_agree(tmp_path, monkeypatch, capsys):
    outputs = {}

    def fake(fns, device, **kw):
        for name, fn in fns.items():
            outputs[name] = fn()
        return {n: timing.Timing([1e-3] * 7) for n in fns}

    monkeypatch.setattr(timing, "interleaved", fake)
    monkeypatch.setattr(models_ldm, "SDXL_CPU", TINY_XL)
    monkeypatch.setattr(models_ldm, "CPU_LATENT", 8)
    cin = dict(models_ldm.CIN256_UNET, attention_head_dim=(1, 1, 1, 2), block_out_channels=(32, 32, 32, 64))
    monkeypatch.setattr(models_ldm, "CIN256_UNET", cin)
    monkeypatch.setattr(models_ldm, "VQ_F4", dict(models_ldm.VQ_F4, block_out_channels=(32, 32, 32),
                                                  num_vq_embeddings=64))
    seen = []
    real = models_ldm._callables

    def check(case, device):
        fns = real(case, device)
        with torch.inference_mode():
            a, b = fns["diffkern"](), fns["diffusers"]()
        seen.append(case.kind)
        assert a.shape == b.shape and (a.float() - b.float()).abs().max() < 1e-3 * (1 + b.abs().max())
        return fns

    monkeypatch.setattr(models_ldm, "_callables", check)
    # the two cheapest rows here (the cin256 UNet and the SDXL end to end run in the same code paths)
    assert models_ldm.main(["--device", "cpu", "--out", str(tmp_path), "--cases", "sdxl-unet", "vq-f4"]) == 0
    assert seen == ["sdxl-unet", "vq-decode"]
    (json_file,) = tmp_path.glob("models_ldm-*.json")
    rows = json.loads(json_file.read_text())["rows"]
    assert {r["backend"] for r in rows} == {"reference", "diffkern", "diffusers"} and len(rows) == 6
    assert list(tmp_path.glob("models_ldm-*.md"))
