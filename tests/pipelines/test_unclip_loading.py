"""Karlo diffusers folders: load_pipeline recognises UnCLIPPipeline / UnCLIPImageVariationPipeline folders."""

import pytest
import torch

from diffkern.models import PriorTransformer, UNet2DModel, UnCLIPTextProjModel, load
from diffkern.pipelines import UnCLIPImageVariationPipeline, UnCLIPPipeline, load_pipeline
from tests.pipelines import max_diff
from tests.pipelines._unclip import clip_vision, diffkern_decoder_or_none, diffusers_components, feature_extractor

diffusers = pytest.importorskip("diffusers")
STEPS = dict(decoder_num_inference_steps=2, super_res_num_inference_steps=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("karlo")
    c = diffusers_components(root)
    if diffkern_decoder_or_none(c["decoder"]) is None:
        pytest.skip("diffkern's UNet2DConditionModel does not build the unCLIP decoder yet")
    text = diffusers.UnCLIPPipeline(**c)
    text.save_pretrained(root / "karlo-v1-alpha")
    var = diffusers.UnCLIPImageVariationPipeline(
        **{k: v for k, v in c.items() if k not in ("prior", "prior_scheduler")},
        image_encoder=clip_vision(), feature_extractor=feature_extractor())
    var.save_pretrained(root / "karlo-v1-alpha-image-variations")
    for p in (text, var):
        p.set_progress_bar_config(disable=True)
    return root, text, var


def test_text_folder(saved):
    root, ref, _ = saved
    pipe = load_pipeline(root / "karlo-v1-alpha")
    assert isinstance(pipe, UnCLIPPipeline)
    assert isinstance(pipe.prior, PriorTransformer) and isinstance(pipe.text_proj, UnCLIPTextProjModel)
    assert isinstance(pipe.super_res_last, UNet2DModel) and type(pipe.decoder).__module__.startswith("diffkern")
    assert pipe.prior_scheduler.config.prediction_type == "sample"
    kw = dict(prior_num_inference_steps=2, output_type="np", **STEPS)
    want = ref("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    got = pipe("a red cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert max_diff(got, want) < 1e-3
    assert isinstance(load(root / "karlo-v1-alpha" / "prior"), PriorTransformer)  # one component folder
    loaded = load(root / "karlo-v1-alpha")  # the generic loader reads the whole folder too
    assert isinstance(loaded.components["super_res_first"], UNet2DModel)
    assert type(loaded.text_encoder).__name__ == "CLIPTextModelWithProjection"
    assert loaded.components["prior_scheduler"]["prediction_type"] == "sample"


def test_variation_folder(saved):
    root, _, ref = saved
    pipe = load_pipeline(root / "karlo-v1-alpha-image-variations")
    assert isinstance(pipe, UnCLIPImageVariationPipeline)
    emb = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    want = ref(image_embeddings=emb, generator=torch.Generator().manual_seed(0), output_type="np", **STEPS).images
    got = pipe(image_embeddings=emb, generator=torch.Generator().manual_seed(0), output_type="np", **STEPS).images
    assert max_diff(got, want) < 1e-3
    double = UnCLIPImageVariationPipeline.from_pretrained(root / "karlo-v1-alpha-image-variations",
                                                          dtype=torch.float64)
    assert all(next(getattr(double, k).parameters()).dtype == torch.float64
               for k in ("decoder", "text_proj", "image_encoder", "text_encoder", "super_res_first"))


def test_wrong_folder_kind(saved):
    root, _, _ = saved
    with pytest.raises(ValueError, match="UnCLIPPipeline"):
        UnCLIPPipeline.from_pretrained(root / "karlo-v1-alpha-image-variations")


# -- diffkern generate --model unclip on the saved folders --------------------------------------------

CLI_STEPS = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2", "--device", "cpu", "--quiet"]


def _png(tmp_path, name, seed=0):
    import numpy as np
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_cli_text_to_image_matches_the_pipeline(saved, tmp_path):
    import numpy as np
    from PIL import Image

    from diffkern.cli import main

    root, ref, _ = saved
    out = tmp_path / "frog.png"
    assert main(["generate", "--karlo", str(root / "karlo-v1-alpha"), "--prompt", "a red cat", "--seed", "3",
                 "--output", str(out), *CLI_STEPS]) == 0
    want = ref("a red cat", generator=torch.Generator().manual_seed(3), prior_num_inference_steps=2,
               decoder_num_inference_steps=2, super_res_num_inference_steps=2, decoder_guidance_scale=8.0,
               prior_guidance_scale=4.0).images[0]
    assert np.abs(np.asarray(Image.open(out), dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1


def test_cli_manipulations(saved, tmp_path):
    from diffkern.cli import main

    root, _, _ = saved
    var = str(root / "karlo-v1-alpha-image-variations")
    a, b = _png(tmp_path, "a.png"), _png(tmp_path, "b.png", 1)
    assert main(["generate", "--model", "unclip", "--karlo", var, "--image", a, "--num-images", "2",
                 "--output", str(tmp_path / "v.png"), *CLI_STEPS]) == 0
    assert (tmp_path / "v-0.png").is_file() and (tmp_path / "v-1.png").is_file()
    assert main(["generate", "--karlo", var, "--interpolate", a, b, "--steps-between", "1",
                 "--output", str(tmp_path / "i.png"), *CLI_STEPS]) == 0
    assert sorted(p.name for p in tmp_path.glob("i-*.png")) == ["i-0.png", "i-1.png", "i-2.png"]
    assert main(["generate", "--karlo", var, "--image", a, "--text-diff", "a cat", "a dog", "--thetas", "0,0.5",
                 "--output", str(tmp_path / "t.png"), *CLI_STEPS]) == 0
    assert (tmp_path / "t-1.png").is_file()


def test_cli_errors(saved, tmp_path, capsys):
    from diffkern.cli import main

    root, _, _ = saved
    assert main(["generate", "--model", "unclip", "--prompt", "a cat"]) == 2
    err = capsys.readouterr().err
    assert "karlo-v1-alpha" in err and "prior-ckpt-step=01000000-of-01000000.ckpt" in err
    assert main(["generate", "--karlo", str(tmp_path), "--prompt", "a cat"]) == 2
    assert "improved-sr-ckpt-step=1.2M.ckpt" in capsys.readouterr().err
    assert main(["generate", "--karlo", str(root / "karlo-v1-alpha"), "--image", _png(tmp_path, "a.png"),
                 *CLI_STEPS]) == 2
    assert "karlo-v1-alpha-image-variations" in capsys.readouterr().err
    assert main(["generate", "--karlo", str(root / "karlo-v1-alpha-image-variations"), "--image",
                 _png(tmp_path, "a.png"), "--text-diff", "a", "b", "--thetas", "0,2", *CLI_STEPS]) == 2
    assert "thetas" in capsys.readouterr().err
    assert main(["generate", "--karlo", str(root / "karlo-v1-alpha"), "--prompt", "x", "--steps", "3"]) == 2
