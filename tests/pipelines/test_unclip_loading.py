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
