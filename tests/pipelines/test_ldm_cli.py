"""`diffkern generate --model ldm` on tiny LDM diffusers folders: PNGs equal to diffusers' images; wrong
inputs for a model are refused naming the option (the pipelines themselves: test_ldm.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffkern.cli import main

diffusers = pytest.importorskip("diffusers")

from .test_ldm import DDIM, _unet2d, _vq  # noqa: E402


def _run(*argv):
    return main(["generate", "--device", "cpu", "--quiet", *map(str, argv)])


def test_unconditional_and_super_resolution_folders(tmp_path, capsys):
    uncond = diffusers.LDMPipeline(vqvae=_vq(), unet=_unet2d(), scheduler=diffusers.DDIMScheduler(**DDIM))
    uncond.set_progress_bar_config(disable=True)
    uncond.save_pretrained(tmp_path / "uncond")
    want = uncond(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(4)).images
    assert _run("--ldm", tmp_path / "uncond", "--steps", 3, "--seed", 4, "--num-images", 2,
                "--output", tmp_path / "u.png") == 0
    for i in range(2):
        got = np.asarray(Image.open(tmp_path / f"u-{i}.png"), dtype=np.int16)
        assert np.abs(got - np.asarray(want[i], dtype=np.int16)).max() <= 1

    sr = diffusers.LDMSuperResolutionPipeline(vqvae=_vq(), unet=_unet2d(in_channels=6),
                                              scheduler=diffusers.DDIMScheduler(**DDIM))
    sr.set_progress_bar_config(disable=True)
    sr.save_pretrained(tmp_path / "sr")
    pixels = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "lo.png")
    assert _run("--ldm", tmp_path / "uncond", "--class-label", 3, "--output", tmp_path / "x.png") == 2
    assert "--class-label: not an input of the LDMPipeline" in capsys.readouterr().err
    assert _run("--ldm", tmp_path / "sr", "--output", tmp_path / "x.png") == 2
    assert "--low-res: the LDMSuperResolutionPipeline needs it" in capsys.readouterr().err
    assert _run("--ldm", tmp_path / "lo.png", "--output", tmp_path / "x.png") == 2
    assert "--ldm-config" in capsys.readouterr().err
