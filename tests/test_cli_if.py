"""`diffkern generate --model if`: tiny IF-I / IF-II / x4-upscaler diffusers folders written with
save_pretrained, the PNGs against IFCascadePipeline's images, and exit 2 naming missing folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffkern.cli import main
from diffkern.pipelines import IFCascadePipeline
from tests.pipelines import clip_tokenizer, tiny_clip
from tests.pipelines._if_helpers import (
    IF_I_SCHEDULER,
    IF_II_SCHEDULER,
    NOISING_SCHEDULER,
    X4_LOW_RES_SCHEDULER,
    X4_SCHEDULER,
    ddim,
    diffusers_ddpm,
    t5_tokenizer,
    tiny_if_sr_unet,
    tiny_if_unet,
    tiny_t5,
    tiny_x4_unet,
    tiny_x4_vae,
)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor:FutureWarning")
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, watermarker=None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("if_cli")
    diffusers.IFPipeline(tokenizer=t5_tokenizer(), text_encoder=tiny_t5(), unet=tiny_if_unet(),
                         scheduler=diffusers_ddpm(IF_I_SCHEDULER), requires_safety_checker=False,
                         **NO_SAFETY).save_pretrained(root / "IF-I")
    diffusers.IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=tiny_if_sr_unet(),
                                        scheduler=diffusers_ddpm(IF_II_SCHEDULER),
                                        image_noising_scheduler=diffusers_ddpm(NOISING_SCHEDULER),
                                        requires_safety_checker=False,
                                        **NO_SAFETY).save_pretrained(root / "IF-II")
    diffusers.StableDiffusionUpscalePipeline(vae=tiny_x4_vae(), text_encoder=tiny_clip(),
                                             tokenizer=clip_tokenizer(root / "cliptok"), unet=tiny_x4_unet(),
                                             low_res_scheduler=diffusers_ddpm(X4_LOW_RES_SCHEDULER),
                                             scheduler=ddim(X4_SCHEDULER),
                                             **NO_SAFETY).save_pretrained(root / "x4")
    return root


def _argv(root, out, stages, *extra):
    argv = ["generate", "--model", "if", "--stages", str(stages), "--if-stage1", str(root / "IF-I"),
            "--prompt", "a red cat", "--if-steps", "2,2,2", "--quiet", "--output", str(out)]
    if stages >= 2:
        argv += ["--if-stage2", str(root / "IF-II")]
    if stages >= 3:
        argv += ["--if-stage3", str(root / "x4")]
    return argv + list(extra)


@pytest.mark.parametrize("stages, size", [(1, 16), (3, 32)])
def test_generate_writes_the_cascades_image(folders, tmp_path, stages, size):
    out = tmp_path / "cat.png"
    assert main(_argv(folders, out, stages, "--if-timesteps", "fast27", "--sequential")) == 0
    got = np.asarray(Image.open(out))
    assert got.shape == (size, size, 3)
    cascade = IFCascadePipeline.from_pretrained(folders / "IF-I", folders / "IF-II" if stages > 1 else None,
                                                folders / "x4" if stages > 2 else None)
    want = cascade("a red cat", generator=torch.Generator().manual_seed(0), num_inference_steps=(2, 2, 2),
                   timesteps=("fast27", None, None), output_type="pil", progress=False).images[0]
    assert np.abs(got.astype(int) - np.asarray(want).astype(int)).max() <= 1


def test_missing_weights_exit_2_naming_the_folders(folders, tmp_path, capsys):
    argv = ["generate", "--model", "if", "--stages", "3", "--if-stage1", str(folders / "IF-I"),
            "--prompt", "a cat"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--if-stage2 is missing" in err and "--if-stage3 is missing" in err and "IF-II-L-v1.0" in err
    assert main(["generate", "--model", "if", "--if-stage1", str(tmp_path), "--prompt", "a cat"]) == 2
    assert "not a diffusers folder" in capsys.readouterr().err
    assert main(_argv(folders, tmp_path / "x.png", 1, "--if-timesteps", "smart51")) == 2
    assert "valid schedules: fast27" in capsys.readouterr().err


def test_prompts_file_batch(folders, tmp_path):
    """--prompts / --outdir through diffkern.distributed: one PNG per line, each seeded by its index."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe moon\n")
    out = tmp_path / "out"
    argv = ["generate", "--model", "if", "--stages", "1", "--if-stage1", str(folders / "IF-I"),
            "--if-steps", "2", "--prompts", str(prompts), "--outdir", str(out), "--quiet"]
    assert main(argv) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and all(np.asarray(Image.open(p)).shape == (16, 16, 3) for p in pngs)
    assert (out / "manifest.jsonl").is_file()
