"""Fused GroupNorm -> SiLU sites: same outputs as diffusers' blocks, same state dict, shared (not
copied) weights, hooks attached after patching still run, blocks already hooked are left."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

import diffkern  # noqa: E402
from diffkern.integrations.diffusers import GroupNormSiLU, norms  # noqa: E402

TOL = 1e-5


def _randomise(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale_like = p.dim() == 1 and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if scale_like else 0.3 * torch.randn_like(p))
    return module.eval()


@pytest.fixture
def count_group_norm(monkeypatch):
    """Counts diffkern.ops.group_norm calls with activation="silu" (the fused path ran)."""
    calls = []
    real = norms.ops.group_norm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("scale") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(norms.ops, "group_norm", spy)
    return calls


BLOCKS = {
    "default_temb": dict(in_channels=8, out_channels=16, temb_channels=12, groups=4),
    "scale_shift": dict(in_channels=16, out_channels=16, temb_channels=12, groups=4,
                        time_embedding_norm="scale_shift"),
    "skip_time_act_down": dict(in_channels=8, out_channels=8, temb_channels=12, groups=2, skip_time_act=True,
                               down=True),
    "no_temb_up": dict(in_channels=8, out_channels=8, temb_channels=None, groups=4, up=True,
                       output_scale_factor=2.0),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_resnet_block_matches_diffusers(name, count_group_norm):
    block = _randomise(ResnetBlock2D(**BLOCKS[name]))
    x = torch.randn(2, block.in_channels, 5, 6)
    temb = torch.randn(2, 12) if BLOCKS[name]["temb_channels"] else None
    keys = list(block.state_dict())
    with torch.no_grad():
        want = block(x, temb)
        report = diffkern.patch(block)
        got = block(x, temb)
    assert report.replaced["resnet_norm_silu"] == 1
    assert list(block.state_dict()) == keys
    assert len(count_group_norm) == 2 and count_group_norm[1] == (name == "scale_shift")
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max())


def test_channels_last_and_gradients_match():
    block = _randomise(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=4,
                                     time_embedding_norm="scale_shift")).train()
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    temb = torch.randn(2, 12)
    want = block(x, temb)
    (gx_want,) = torch.autograd.grad(want.square().sum(), x)
    diffkern.patch(block)
    got = block(x, temb)
    (gx_got,) = torch.autograd.grad(got.square().sum(), x)
    assert (got - want).abs().max() <= TOL * want.abs().max()
    assert (gx_got - gx_want).abs().max() <= 1e-4 * gx_want.abs().max()


def test_weights_are_shared_not_copied():
    block = _randomise(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4))
    w1 = block.norm1.weight
    diffkern.patch(block)
    assert isinstance(block.norm1, GroupNormSiLU) and block.norm1.weight is w1
    x = torch.randn(1, 8, 4, 4)
    state = {k: torch.randn_like(v) for k, v in block.state_dict().items()}
    block.load_state_dict(state)  # a weight update after patching (e.g. a LoRA fuse) is seen
    with torch.no_grad():
        got = block(x, None)
        diffkern.unpatch(block)
        assert type(block) is ResnetBlock2D and type(block.norm1) is torch.nn.GroupNorm
        assert block.norm1.weight is w1 and torch.equal(w1, state["norm1.weight"])
        want = block(x, None)
    assert (got - want).abs().max() <= TOL * want.abs().max()


def test_hooks_attached_after_patching_run():
    from diffusers.hooks import HookRegistry, ModelHook

    class Count(ModelHook):
        def __init__(self):
            super().__init__()
            self.n = 0

        def pre_forward(self, module, *args, **kwargs):
            self.n += 1
            return args, kwargs

    block = _randomise(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=4))
    diffkern.patch(block)
    on_block, on_norm = Count(), Count()
    HookRegistry.check_if_exists_or_initialize(block).register_hook(on_block, "count")
    HookRegistry.check_if_exists_or_initialize(block.norm2).register_hook(on_norm, "count")
    x, temb = torch.randn(1, 8, 4, 4), torch.randn(1, 12)
    with torch.no_grad():
        block(x, temb)
    assert (on_block.n, on_norm.n) == (1, 1)
    # unpatching under a hook that wraps our forward: the block falls back to diffusers' forward
    diffkern.unpatch(block)
    with torch.no_grad():
        assert type(block.norm2) is torch.nn.GroupNorm and block(x, temb).shape == x.shape
    assert on_block.n == 2


def test_blocks_hooked_before_patching_are_left():
    from diffusers.hooks import HookRegistry, ModelHook

    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=4)
    HookRegistry.check_if_exists_or_initialize(block.norm1).register_hook(ModelHook(), "noop")
    report = diffkern.patch(block)
    assert report.replaced["resnet_norm_silu"] == 0
    assert "hooks" in report.left[0][2] and type(block.norm1) is torch.nn.GroupNorm


def test_vae_out_norm_and_non_silu_blocks():
    from diffusers.models.autoencoders.vae import Encoder

    torch.manual_seed(0)
    enc = _randomise(Encoder(in_channels=3, out_channels=4, down_block_types=("DownEncoderBlock2D",),
                             block_out_channels=(8,), norm_num_groups=4, act_fn="silu"))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = enc(x)
        report = diffkern.patch(enc)
        got = enc(x)
    assert report.replaced["out_norm_silu"] == 1 and report.replaced["resnet_norm_silu"] >= 2
    assert isinstance(enc.conv_act, torch.nn.Identity)
    assert (got - want).abs().max() <= TOL * want.abs().max()
    diffkern.unpatch(enc)
    assert type(enc.conv_act) is torch.nn.SiLU and type(enc.conv_norm_out) is torch.nn.GroupNorm

    mish = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4, non_linearity="mish")
    report = diffkern.patch(mish)
    assert report.replaced["resnet_norm_silu"] == 0 and "Mish" in report.left[0][2]


def test_layerwise_casting_enabled_after_patching():
    """diffusers' layerwise-casting hooks (bf16 storage, fp32 compute) on a patched UNet: the output
    of the unpatched model with the same hooks."""
    from tests.pipelines import tiny_unet

    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 7, 32)
    plain, patched = tiny_unet(), tiny_unet()
    diffkern.patch(patched)
    for unet in (plain, patched):
        unet.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    with torch.no_grad():
        want, got = plain(x, t, text).sample, patched(x, t, text).sample
    assert patched.conv_in.weight.dtype == torch.bfloat16
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max())


def test_patched_model_survives_pickle_and_deepcopy(tmp_path):
    """torch.save of a whole patched model (not just its state dict) loads back fused and equal."""
    import copy

    block = _randomise(ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=4,
                                     time_embedding_norm="scale_shift"))
    x, temb = torch.randn(1, 8, 4, 4), torch.randn(1, 12)
    diffkern.patch(block)
    torch.save(block, tmp_path / "block.pt")
    loaded = torch.load(tmp_path / "block.pt", weights_only=False)
    twin = copy.deepcopy(block)
    with torch.no_grad():
        want = block(x, temb)
        for other in (loaded, twin):
            assert isinstance(other.norm2, GroupNormSiLU) and type(other) is type(block)
            assert torch.equal(other(x, temb), want)
    diffkern.unpatch(loaded)
    assert type(loaded) is ResnetBlock2D and type(loaded.norm1) is torch.nn.GroupNorm
    with torch.no_grad():
        assert (loaded(x, temb) - want).abs().max() <= TOL * want.abs().max()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_resnet_blocks_are_fused(approximate, count_group_norm, monkeypatch):
    """DeepFloyd IF's resnets (act_fn "gelu" = nn.GELU(), scale-shift norm, skip_time_act): both norm
    sites become one fused group_norm with activation "gelu" ("gelu_tanh" for nn.GELU("tanh")), same
    output, and unpatch brings diffusers' modules back."""
    acts = []
    real = norms.ops.group_norm
    monkeypatch.setattr(norms.ops, "group_norm", lambda *a, **k: (acts.append(k["activation"]), real(*a, **k))[1])
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4, non_linearity="gelu",
                          time_embedding_norm="scale_shift", skip_time_act=True)
    block.nonlinearity = torch.nn.GELU(approximate=approximate)
    block = _randomise(block)
    x, temb = torch.randn(2, 8, 5, 6), torch.randn(2, 12)
    with torch.no_grad():
        want = block(x, temb)
        report = diffkern.patch(block)
        got = block(x, temb)
    assert report.replaced["resnet_norm_silu"] == 1 and not report.left
    assert acts == ["gelu" if approximate == "none" else "gelu_tanh"] * 2
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max())
    diffkern.unpatch(block)
    assert type(block.norm1) is torch.nn.GroupNorm and type(block.nonlinearity) is torch.nn.GELU


def test_if_unet_out_norm_gelu_is_fused():
    """IF's UNet2DConditionModel (act_fn "gelu"): conv_norm_out -> conv_act (GELU) fused too."""
    from tests.integrations import _tiny

    unet = _randomise(_tiny.if_stage1(act_fn="gelu").unet)
    x, t, text = torch.randn(1, 3, 8, 8), torch.tensor(10), torch.randn(1, 7, unet.config.encoder_hid_dim or 32)
    with torch.no_grad():
        want = unet(x, t, text).sample
        report = diffkern.patch(unet)
        got = unet(x, t, text).sample
    assert report.replaced["out_norm_silu"] == 1 and report.replaced["resnet_norm_silu"] >= 2
    assert not [r for r in report.left if r[0] in ("resnet_norm_silu", "out_norm_silu")], report.left
    assert unet.conv_norm_out.activation == "gelu" and isinstance(unet.conv_act, norms.ActFusedIntoNorm)
    assert (got - want).abs().max() <= TOL * max(1.0, want.abs().max())
