"""Issue 21: a patched pipeline behaves as the unpatched one around the forward path too --
`from_config` scheduler swaps, `save_pretrained` -> diffusers' `DiffusionPipeline.from_pretrained`
(also where diffkern cannot be imported), `set_default_attn_processor()`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffkern  # noqa: E402
from tests.integrations import _tiny  # noqa: E402

KW = dict(prompt="a photo of a cat", negative_prompt="a dog", num_inference_steps=2, height=32, width=32,
          output_type="np")


def _images(pipe):
    with torch.no_grad():
        return np.asarray(pipe(generator=torch.Generator().manual_seed(0), **KW).images, dtype=np.float64)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler",
                                  "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_from_config_swap_builds_the_unpatched_scheduler(name, tmp_path):
    """`Other.from_config(pipe.scheduler.config)` on a patched pipeline = on the unpatched one: the
    keys the user never set (_use_default_values) and the keys the class does not take (SD's
    clip_sample=False in a PNDM config) carry over."""
    import diffusers

    cls = getattr(diffusers, name)
    pipe = _tiny.sd(tmp_path)
    want = cls.from_config(pipe.scheduler.config)
    diffkern.patch(pipe)
    assert type(pipe.scheduler).__module__.startswith("diffkern")
    got = cls.from_config(pipe.scheduler.config)
    assert dict(got.config) == dict(want.config)


def test_save_pretrained_loads_back_with_diffusers(tmp_path):
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler

    pipe = _tiny.sd(tmp_path)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    want = _images(pipe)
    first = diffkern.patch(pipe)
    assert first.replaced["scheduler"] == 1
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    components = {k: v for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    assert components["scheduler"] == ["diffusers", "EulerDiscreteScheduler"], index
    assert all(lib in ("diffusers", "transformers") for lib, _ in components.values()), index
    sched = json.loads((tmp_path / "saved" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"

    back = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    back.set_progress_bar_config(disable=True)
    assert type(back.scheduler) is EulerDiscreteScheduler  # diffusers' own classes
    assert np.abs(_images(back) - want).max() < 1e-5
    again = diffkern.patch(back)  # the fast path again on the loaded pipeline
    assert again.replaced == first.replaced, again
    assert np.abs(_images(back) - want).max() < 1e-3


def test_saved_folder_loads_where_diffkern_is_absent(tmp_path):
    pipe = _tiny.sd(tmp_path)
    diffkern.patch(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    code = ("import sys; sys.modules['diffkern'] = None\n"  # import diffkern -> ImportError
            "from diffusers import DiffusionPipeline\n"
            f"p = DiffusionPipeline.from_pretrained({str(tmp_path / 'saved')!r})\n"
            "print(type(p).__name__, type(p.scheduler).__module__, type(p.unet).__module__)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["StableDiffusionPipeline", "diffusers.schedulers.scheduling_pndm",
                           "diffusers.models.unets.unet_2d_condition"], out


def test_set_default_attn_processor_on_a_patched_model(tmp_path):
    from diffusers.models.attention_processor import AttnAddedKVProcessor, AttnProcessor

    pipe = _tiny.sd(tmp_path)
    want = _images(pipe)
    diffkern.patch(pipe)
    pipe.unet.set_default_attn_processor()
    pipe.vae.set_default_attn_processor()
    for model in (pipe.unet, pipe.vae):
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor}
    assert np.abs(_images(pipe) - want).max() < 1e-3
    unet = _tiny.if_stage1().unet
    diffkern.patch(unet)
    unet.set_default_attn_processor()
    assert {type(p) for p in unet.attn_processors.values()} == {AttnAddedKVProcessor}


def test_swap_keeps_config_values_the_pipeline_edited(tmp_path):
    """StableDiffusionPipeline.__init__ rewrites an old scheduler config (steps_offset 0 -> 1) and leaves
    the key in `_use_default_values`; diffkern's scheduler must run with the edited value (diffusers'
    own pipeline tests: 0.012 image difference before this was fixed)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    old = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(**{**_tiny.sd(tmp_path).components, "scheduler": old})
    assert pipe.scheduler.config.steps_offset == 1 and "steps_offset" in pipe.scheduler.config._use_default_values
    pipe.scheduler.set_timesteps(2)
    want = pipe.scheduler.timesteps.tolist()
    diffkern.patch(pipe)
    assert type(pipe.scheduler).__module__.startswith("diffkern")
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == want == [501, 1]
    assert dict(pipe.scheduler.config) == dict(old.config)
