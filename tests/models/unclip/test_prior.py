"""PriorTransformer and UnCLIPTextProjModel against diffusers' (tiny random weights), parameter counts."""

import pytest
import torch

from diffkern.models import from_diffusers
from diffkern.models.unclip import PriorTransformer, UnCLIPTextProjModel
from tests.models._helpers import BACKENDS, backend_context, max_diff, randomise

diffusers = pytest.importorskip("diffusers")

TINY_PRIOR = dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, embedding_dim=16, num_embeddings=7,
                  additional_embeddings=4)


def _inputs(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    D, T = cfg["embedding_dim"], cfg["num_embeddings"]
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False  # a padded prompt
    mask[1, 5:] = False
    return (torch.randn(B, D, generator=g), torch.randn(B, cfg.get("embedding_proj_dim") or D, generator=g),
            torch.randn(B, T, D, generator=g), mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [{}, dict(norm_in_type="layer", embedding_proj_norm_type="layer",
                                            embedding_proj_dim=10, clip_embed_dim=20, time_embed_dim=30)])
def test_prior_matches_diffusers(backend, extra, used_backends):
    cfg = dict(TINY_PRIOR, **extra)
    ref = randomise(diffusers.PriorTransformer(**cfg), seed=1)
    ours = from_diffusers(ref)
    assert isinstance(ours, PriorTransformer)
    x, proj, text, mask = _inputs(cfg)
    for t, m in ((torch.tensor(17), mask), (torch.tensor([3, 500, 999]), mask), (999, None)):
        with torch.no_grad():
            want = ref(x, t, proj, encoder_hidden_states=text, attention_mask=m).predicted_image_embedding
            with backend_context(backend):
                got = ours(x, t, proj, encoder_hidden_states=text, attention_mask=m)
        assert got.predicted_image_embedding.shape == want.shape
        assert max_diff(got.predicted_image_embedding, want) < 1e-5
        assert max_diff(ours(x, t, proj, text, m, return_dict=False)[0], want) < 1e-5
    assert used_backends["attention"]
    lat = torch.randn(2, want.shape[1])
    assert torch.equal(ours.post_process_latents(lat), ref.post_process_latents(lat))


def test_prior_without_prd_and_text_projection():
    cfg = dict(TINY_PRIOR, added_emb_type=None, encoder_hid_proj_type=None, additional_embeddings=3)
    ref = randomise(diffusers.PriorTransformer(**cfg), seed=2)
    ours = from_diffusers(ref)
    x, proj, _, mask = _inputs(cfg)
    text = torch.randn(3, 7, 24)  # without encoder_hidden_states_proj the tokens come at the inner width
    with torch.no_grad():
        want = ref(x, 5, proj, encoder_hidden_states=text, attention_mask=mask)[0]
        assert max_diff(ours(x, 5, proj, encoder_hidden_states=text, attention_mask=mask)[0], want) < 1e-5


def test_prior_bias_is_causal_plus_padding():
    """One additive bias: -1e4 above the diagonal, -1e4 on padded text keys (summing where both)."""
    prior = PriorTransformer(**TINY_PRIOR)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    bias = prior.attention_bias(mask, torch.float64)[0, 0]
    S = 11
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    want = torch.where(j > i, -1e4, 0.0).double() + torch.where((j >= 4) & (j < 7), -1e4, 0.0).double()
    assert torch.equal(bias, want)


def test_prior_bad_inputs():
    prior = PriorTransformer(**TINY_PRIOR)
    x, proj, text, mask = _inputs(TINY_PRIOR)
    with pytest.raises(ValueError, match="hidden_states"):
        prior(x[:, :5], 1, proj, text, mask)
    with pytest.raises(ValueError, match="proj_embedding"):
        prior(x, 1, proj[:2], text, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        prior(x, 1, proj, text, mask[:, :4])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        prior(x, 1, proj, None, mask)
    with pytest.raises(ValueError, match="norm_in_type"):
        PriorTransformer(norm_in_type="group")
    with pytest.raises(TypeError, match="num_heads"):  # diffusers' constructor: an unknown keyword
        PriorTransformer(num_heads=3)


def test_karlo_parameter_counts():
    """The issue's published sizes, from the configs load_karlo builds (meta device: no memory)."""
    from diffkern.models import UNet2DConditionModel, UNet2DModel
    from diffkern.models.checkpoints.karlo import KARLO_DECODER, KARLO_SUPER_RES

    with torch.device("meta"):
        prior = PriorTransformer()
        proj = UnCLIPTextProjModel(time_embed_dim=1280, cross_attention_dim=1536)
        decoder = UNet2DConditionModel(**KARLO_DECODER)
        sr = UNet2DModel(**KARLO_SUPER_RES)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(prior) == 1_022_030_080
    assert count(proj) == 7_878_400
    assert count(decoder) == 885_439_686
    assert count(sr) == 691_579_523


@pytest.mark.parametrize("guided", [True, False])
def test_text_proj_matches_diffusers(guided):
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel as Ref

    ref = randomise(Ref(clip_extra_context_tokens=3, clip_embeddings_dim=16, time_embed_dim=24,
                        cross_attention_dim=20), seed=3)
    ours = from_diffusers(ref)
    assert isinstance(ours, UnCLIPTextProjModel)
    g = torch.Generator().manual_seed(4)
    B = 2
    image = torch.randn(B, 16, generator=g)
    n = 2 * B if guided else B
    kw = dict(prompt_embeds=torch.randn(n, 16, generator=g),
              text_encoder_hidden_states=torch.randn(n, 7, 16, generator=g), do_classifier_free_guidance=guided)
    with torch.no_grad():
        want = ref(image_embeddings=image, **kw)
        got = ours(image_embeddings=image, **kw)
    assert got[0].shape == (n, 10, 20) and got[1].shape == (n, 24)
    assert max_diff(got[0], want[0]) < 1e-6 and max_diff(got[1], want[1]) < 1e-6
    with pytest.raises(ValueError, match="image_embeddings"):
        ours(image_embeddings=image[:, :5], **kw)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_prior_half_precision(device):
    """fp16: our error against the float64 model is at most 2x diffusers' own fp16 error (+ 1e-3)."""
    import copy

    ref = randomise(diffusers.PriorTransformer(**TINY_PRIOR), seed=7)
    ours = from_diffusers(ref)
    x, proj, text, mask = _inputs(TINY_PRIOR)
    with torch.no_grad():
        truth = copy.deepcopy(ref).double()(x.double(), 321, proj.double(), text.double(), mask)[0]
        half = [t.to(device, torch.float16) for t in (x, proj, text)]
        got = ours.to(device, torch.float16)(half[0], 321, half[1], half[2], mask.to(device))[0]
        want = copy.deepcopy(ref).to(device, torch.float16)(half[0], 321, half[1], half[2], mask.to(device))[0]
    assert got.dtype == torch.float16
    err_ours, err_ref = max_diff(got.cpu(), truth), max_diff(want.cpu(), truth)
    assert err_ours <= 2 * err_ref + 1e-3, (err_ours, err_ref)
