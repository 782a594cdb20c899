"""diffkern's VQModel against diffusers' VQModel: same keys, encode / quantize / decode outputs, commit
loss, force_not_quantize, codebook lookup, save / load through diffusers' ModelMixin."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffkern.models.vq_model import VQModel  # noqa: E402

from ._helpers import BACKENDS, backend_context, check_backends, max_diff, randomise  # noqa: E402

# VQ-f4 of the LDM release (3 levels, 3 latent channels) shrunk; a codebook small enough that neighbours
# are close (the quantizer's choice is then sensitive to small errors).
CONFIG = dict(block_out_channels=[8, 16, 16], in_channels=3, out_channels=3, layers_per_block=1,
              down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
              latent_channels=3, norm_num_groups=4, num_vq_embeddings=64, vq_embed_dim=3)


def _pair():
    torch.manual_seed(0)
    theirs = randomise(diffusers.VQModel(**CONFIG), 1)
    ours = VQModel(**CONFIG).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_diffusers(backend, used_backends):
    theirs, ours = _pair()
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want_h = theirs.encode(x).latents
        with backend_context(backend):
            h = ours.encode(x).latents
            dec = ours.decode(want_h)
            raw = ours.decode(want_h, force_not_quantize=True).sample
            full = ours(x)
        want = theirs.decode(want_h)
    assert h.shape == (2, 3, 5, 5) and max_diff(h, want_h) < 1e-5
    assert max_diff(dec.sample, want.sample) < 1e-5
    assert torch.allclose(dec.commit_loss, want.commit_loss, atol=1e-6)
    assert max_diff(raw, theirs.decode(want_h, force_not_quantize=True).sample) < 1e-5
    assert max_diff(raw, dec.sample) > 1e-3  # quantizing changed something: the codebook is in the path
    assert max_diff(full.sample, theirs(x).sample) < 1e-5
    check_backends(used_backends, backend)


def test_codebook_lookup_and_tuple_outputs():
    theirs, ours = _pair()
    ours.register_to_config(lookup_from_codebook=True)
    theirs.register_to_config(lookup_from_codebook=True)
    idx = torch.randint(0, 64, (2 * 4 * 4,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, loss = ours.decode(idx, force_not_quantize=True, shape=(2, 4, 4, 3), return_dict=False)
        want = theirs.decode(idx, force_not_quantize=True, shape=(2, 4, 4, 3)).sample
    assert got.shape == (2, 3, 16, 16) and max_diff(got, want) < 1e-5 and not loss.any()


def test_save_and_load_through_diffusers(tmp_path):
    theirs, ours = _pair()
    ours.save_pretrained(tmp_path)
    back = VQModel.from_pretrained(tmp_path)
    other = diffusers.VQModel.from_pretrained(tmp_path)
    assert type(back) is VQModel and back.config.num_vq_embeddings == 64
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert max_diff(back(x).sample, ours(x).sample) == 0
        assert max_diff(other(x).sample, ours(x).sample) < 1e-5


def test_unsupported_options_name_the_option():
    with pytest.raises(ValueError, match="norm_type"):
        VQModel(**dict(CONFIG, norm_type="spatial"))
    with pytest.raises(ValueError, match="down_block_types"):
        VQModel(**dict(CONFIG, down_block_types=["AttnDownEncoderBlock2D"] * 3))
    with pytest.raises(ValueError, match=r"decode: h must be \(B, 3"):
        VQModel(**CONFIG).decode(torch.zeros(1, 5, 4, 4), force_not_quantize=True)
