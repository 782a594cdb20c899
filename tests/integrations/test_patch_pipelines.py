"""diffkern.patch(pipe) gives the images of the unpatched diffusers pipeline (same generator, fp32,
CPU, within 1e-3) for every pipeline family issue 12 names, and replaces what it says it does."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffkern  # noqa: E402
from tests.integrations import _tiny  # noqa: E402


def _gen():
    return torch.Generator().manual_seed(0)


def _image(shape, seed=11, signed=False):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return x * 2 - 1 if signed else x


def _sd_kwargs(**extra):
    base = dict(prompt="a photo of a cat", negative_prompt="a dog", num_inference_steps=2, height=32,
                width=32, output_type="np")
    return {**base, **extra}


def _if_kwargs(**extra):
    return dict(prompt_embeds=_tiny.t5_embeds(seed=3), negative_prompt_embeds=_tiny.t5_embeds(seed=4),
                num_inference_steps=2, output_type="pt", **extra)


_UNCLIP_STEPS = dict(decoder_num_inference_steps=2, super_res_num_inference_steps=2, output_type="np")

# name: (builder(tmp_path), call kwargs, kinds that must be replaced)
CASES = {
    "sd1": (lambda p: _tiny.sd(p), _sd_kwargs(), ("attention", "resnet_norm_silu", "out_norm_silu")),
    "sd2_v": (lambda p: _tiny.sd(p, v2=True), _sd_kwargs(), ("attention", "resnet_norm_silu", "scheduler")),
    "sdxl": (_tiny.sdxl, _sd_kwargs(), ("attention", "resnet_norm_silu", "out_norm_silu")),
    "controlnet": (_tiny.sd_controlnet, _sd_kwargs(image=_image((1, 3, 32, 32))),
                   ("attention", "resnet_norm_silu")),
    "img2img": (_tiny.sd_img2img,
                _sd_kwargs(image=_image((1, 3, 32, 32)), strength=0.5, num_inference_steps=4, height=None,
                           width=None),
                ("attention", "resnet_norm_silu", "scheduler")),
    "inpaint": (_tiny.sd_inpaint, _sd_kwargs(image=_image((1, 3, 32, 32)),
                                             mask_image=(_image((1, 1, 32, 32), seed=12) > 0.5).float()),
                ("attention", "resnet_norm_silu", "out_norm_silu")),
    # IF's GELU resnets and conv_norm_out -> GELU are fused too (activation "gelu")
    "if": (lambda p: _tiny.if_stage1(), _if_kwargs(height=8, width=8),
           ("added_kv_attention", "resnet_norm_silu", "out_norm_silu")),
    "if_sr": (lambda p: _tiny.if_super_resolution(), _if_kwargs(image=_image((1, 3, 8, 8), signed=True),
                                                                 noise_level=100),
              ("added_kv_attention", "resnet_norm_silu", "out_norm_silu")),
    "unclip": (_tiny.unclip, dict(prompt="a red cat", prior_num_inference_steps=2, **_UNCLIP_STEPS),
               ("attention", "added_kv_attention", "resnet_norm_silu", "out_norm_silu")),
    "unclip_variation": (_tiny.unclip_image_variation, dict(image=_image((1, 3, 16, 16)), **_UNCLIP_STEPS),
                         ("added_kv_attention", "resnet_norm_silu", "out_norm_silu")),
}


def _images(pipe, kwargs):
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with torch.no_grad():
        out = pipe(generator=_gen(), **kwargs).images
    return np.asarray(out.cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64)


def _swappable(pipe):
    """Names of the pipeline's schedulers whose class name diffkern has."""
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from diffkern.integrations.diffusers.scheduler_swap import diffkern_scheduler_class

    return [n for n in pipe.config if isinstance(getattr(pipe, n, None), SchedulerMixin)
            and diffkern_scheduler_class(type(getattr(pipe, n)).__name__)]


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the diffkern op calls the patched modules make: {"attention": n, "group_norm": n}."""
    from diffkern.integrations.diffusers import norms, processors

    calls = {"attention": 0, "group_norm": 0}

    def counting(module, name):
        real = getattr(module.ops, name)

        def spy(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module.ops, name, spy)

    counting(processors, "attention")
    counting(norms, "group_norm")
    return calls


@pytest.mark.parametrize("name", list(CASES))
def test_patched_pipeline_same_images(name, tmp_path, op_calls):
    build, kwargs, kinds = CASES[name]
    pipe = build(tmp_path)
    expected = _images(pipe, kwargs)
    assert op_calls == {"attention": 0, "group_norm": 0}
    swappable = _swappable(pipe)
    report = diffkern.patch(pipe)
    for kind in kinds:
        assert report.replaced[kind] > 0, (kind, report)
    # every scheduler diffkern has a class of the same name for is swapped (none is left for its config)
    assert report.replaced["scheduler"] == len(swappable), report
    got = _images(pipe, kwargs)
    # the fast paths ran: diffkern's attention and fused group_norm ops, not diffusers' modules
    assert op_calls["attention"] > 0
    assert (op_calls["group_norm"] > 0) == any("norm_silu" in k for k in kinds)
    assert got.shape == expected.shape
    assert np.isfinite(got).all()
    err = np.abs(got - expected).max()
    assert err < 1e-3, (name, err, report)


def test_unpatch_restores_the_same_objects(tmp_path):
    build, kwargs, _ = CASES["sd1"]
    pipe = build(tmp_path)
    procs = {n: p for n, p in pipe.unet.attn_processors.items()}
    modules = {n: m for n, m in pipe.unet.named_modules()}
    scheduler, keys = pipe.scheduler, list(pipe.unet.state_dict())
    vae_keys = list(pipe.vae.state_dict())
    first = diffkern.patch(pipe)
    assert list(pipe.unet.state_dict()) == keys and list(pipe.vae.state_dict()) == vae_keys
    again = diffkern.patch(pipe)
    assert again.total == 0 and again.already == first.replaced, again
    restored = diffkern.unpatch(pipe)
    assert restored.replaced == first.replaced
    assert all(pipe.unet.attn_processors[n] is p for n, p in procs.items())
    assert {n: m for n, m in pipe.unet.named_modules()} == modules
    assert pipe.scheduler is scheduler
    assert pipe.config["scheduler"] == ("diffusers", type(scheduler).__name__)
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())


def test_patch_options_select_kinds(tmp_path):
    pipe = _tiny.sd(tmp_path)
    report = diffkern.patch(pipe, attention=False, scheduler=False)
    assert report.replaced["attention"] == 0 and report.replaced["scheduler"] == 0
    assert report.replaced["resnet_norm_silu"] > 0
    assert all(type(p).__module__.startswith("diffusers") for p in pipe.unet.attn_processors.values())


def test_report_names_what_was_left():
    """Resnets with an activation the norm kernel does not fuse (Mish) stay diffusers' and the report
    says why (IF's GELU resnets are fused: tests/integrations/test_norms.py)."""
    pipe = _tiny.if_stage1(act_fn="mish")
    report = diffkern.patch(pipe)
    left = [(kind, why) for kind, _, why in report.left if kind == "resnet_norm_silu"]
    assert left and all("Mish" in why for _, why in left)
    assert "left" in repr(report) and "Mish" in repr(report)


@pytest.mark.parametrize("obj", [torch.nn.Linear(2, 2),
                                 torch.nn.Sequential(torch.nn.GroupNorm(1, 2), torch.nn.SiLU())])
def test_patch_without_diffusers_modules_is_a_clear_error(obj):
    with pytest.raises(TypeError, match="diffusers"):
        diffkern.patch(obj)


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="DiffusionPipeline"):
        diffkern.patch("unet")


def test_import_diffkern_does_not_import_the_integration():
    import subprocess
    import sys

    # the integration is imported on first use of diffkern.patch & co, and imports diffusers only per call
    code = ("import sys, diffkern; assert 'diffkern.integrations.diffusers' not in sys.modules; "
            "before = 'diffusers' in sys.modules; diffkern.PatchReport; "
            "assert 'diffkern.integrations.diffusers' in sys.modules; "
            "assert ('diffusers' in sys.modules) == before")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_schedulers_diffkern_lacks_are_left_and_reported(tmp_path):
    from diffusers import DEISMultistepScheduler

    from diffkern.integrations.diffusers.scheduler_swap import diffkern_scheduler_class

    if diffkern_scheduler_class("DEISMultistepScheduler") is not None:
        pytest.skip("diffkern has a DEISMultistepScheduler now: pick another class diffkern lacks")
    pipe = _tiny.sd(tmp_path)
    pipe.scheduler = DEISMultistepScheduler.from_config(pipe.scheduler.config)
    report = diffkern.patch(pipe)
    assert report.replaced["scheduler"] == 0 and type(pipe.scheduler) is DEISMultistepScheduler
    assert ("scheduler", "scheduler", "diffkern has no DEISMultistepScheduler") in report.left
