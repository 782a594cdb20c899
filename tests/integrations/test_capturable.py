"""The capturable denoising step (UNet + CFG + scheduler update, coefficients read on the device by a
device-side step index) gives the unpatched diffusers pipeline's images, compiles as one
torch.compile(fullgraph=True) graph, and bakes nothing in (a second run with other step counts and
guidance scales still equals unpatched diffusers).

Compiled tests trace a tiny UNet with dynamo (seconds each on CPU); the full family x scheduler matrix
under torch.compile runs with DIFFKERN_SLOW_TESTS=1, the default run compiles SD 1.x + DPM-Solver++ 2M
(the multistep case) with a graph-counting backend (dynamo's capture itself, fullgraph=True)."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffkern  # noqa: E402
from diffkern.integrations.diffusers import capturable  # noqa: E402
from tests.integrations import _tiny  # noqa: E402

SLOW = pytest.mark.skipif(os.environ.get("DIFFKERN_SLOW_TESTS") != "1",
                          reason="compiled family x scheduler matrix: set DIFFKERN_SLOW_TESTS=1")
# float32 through a few steps; precomputed float64 coefficients vs diffusers' float32 arithmetic.
# IF (pixel space, no VAE) carries the raw sample, of larger magnitude: 1e-4
TOL = {"sd": 1e-4, "sdxl": 1e-4, "if": 1e-4}
SETTINGS = ((3, 7.5), (4, 1.0))  # (steps, guidance): with and without classifier-free guidance


def _scheduler(pipe, name):
    import diffusers

    cfg = dict(pipe.scheduler.config)
    if isinstance(pipe, diffusers.IFPipeline):
        # IF's released DDPM config has learned variance, clipping and thresholding: diffusers' own DDIM /
        # Euler cannot take the 6-channel output, and clipping / thresholding are not linear steps
        cfg.pop("_use_default_values", None)
        cfg.update(variance_type=None, thresholding=False, clip_sample=False)
    return getattr(diffusers, name).from_config(cfg)


def _build(family, tmp_path):
    if family == "sd":
        return _tiny.sd(tmp_path), dict(prompt="a photo of a cat", negative_prompt="a dog", height=32, width=32,
                                        output_type="np")
    if family == "sdxl":
        return _tiny.sdxl(tmp_path), dict(prompt="a photo of a cat", negative_prompt="a dog", height=32, width=32,
                                          output_type="np")
    return _tiny.if_stage1(), dict(prompt_embeds=_tiny.t5_embeds(seed=3),
                                   negative_prompt_embeds=_tiny.t5_embeds(seed=4), height=8, width=8,
                                   output_type="pt")


def _images(pipe, kwargs, steps, guidance):
    with torch.no_grad():
        out = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=steps, guidance_scale=guidance,
                   **kwargs).images
    return np.asarray(out.cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64)


def _check(family, scheduler, tmp_path, **patch_kwargs):
    pipe, kwargs = _build(family, tmp_path)
    pipe.scheduler = _scheduler(pipe, scheduler)
    want = [_images(pipe, kwargs, *s) for s in SETTINGS]
    if patch_kwargs:
        report = diffkern.patch(pipe, **patch_kwargs)
        assert report.replaced["capturable_step"] == 1, report
    else:  # the captured step run eagerly: the coefficient tables alone
        diffkern.patch(pipe)
        capturable.patch_pipeline(pipe)
    engine = pipe._diffkern_capture
    for (steps, guidance), expected in zip(SETTINGS, want):
        got = _images(pipe, kwargs, steps, guidance)
        assert got.shape == expected.shape and np.isfinite(got).all()
        err = np.abs(got - expected).max()
        assert err < TOL[family], (family, scheduler, steps, guidance, err)
    assert engine.steps == sum(s for s, _ in SETTINGS) and engine.calls == len(SETTINGS)
    return pipe


CASES = [("sd", "DDIMScheduler"), ("sd", "EulerDiscreteScheduler"), ("sd", "DPMSolverMultistepScheduler"),
         ("sdxl", "EulerDiscreteScheduler"), ("sdxl", "DPMSolverMultistepScheduler"),
         ("if", "DDIMScheduler"), ("if", "DPMSolverMultistepScheduler")]


# SD 1.x + DPM-Solver++ 2M runs compiled in the default set (test_compiled_step_is_one_graph_...)
FAST = [("sdxl", "EulerDiscreteScheduler"), ("if", "DDIMScheduler")]


@pytest.mark.parametrize("family,scheduler", FAST + [pytest.param(*c, marks=SLOW) for c in CASES if c not in FAST])
def test_step_tables_reproduce_diffusers(family, scheduler, tmp_path):
    """Eager run of the captured step (UNet input / D[idx], CFG, A x + B e + C x0_prev) = diffusers."""
    _check(family, scheduler, tmp_path)


def _counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_compiled_step_is_one_graph_and_bakes_nothing_in(tmp_path):
    """SD 1.x + DPM-Solver++ 2M under torch.compile(fullgraph=True) (a graph break raises): 3 steps with
    CFG, then 4 without, both equal unpatched diffusers; one graph per static configuration (with /
    without CFG), never one per step."""
    torch._dynamo.reset()
    graphs = []
    pipe = _check("sd", "DPMSolverMultistepScheduler", tmp_path, compile={"backend": _counting_backend(graphs)})
    # one graph with CFG (batch 2), one without (batch 1); the UNet's convolutions are in them
    assert len(graphs) == 2, len(graphs)
    assert all(any("conv2d" in str(n.target) for n in g.graph.nodes) for g in graphs)
    # step index and coefficients are data: a call with a new step count compiles nothing new
    pipe(prompt="a photo of a cat", num_inference_steps=5, guidance_scale=7.5, height=32, width=32,
         output_type="np", generator=torch.Generator().manual_seed(0))
    assert len(graphs) == 2


@SLOW
def test_compiled_step_aot_eager(tmp_path):
    """aot_eager traces diffkern's custom ops (attention, fused GroupNorm) through their fake kernels."""
    torch._dynamo.reset()
    _check("sd", "DDIMScheduler", tmp_path, compile="aot_eager")


@SLOW
@pytest.mark.parametrize("family,scheduler", [c for c in CASES if c != ("sd", "DPMSolverMultistepScheduler")]
                         + [("sdxl", "DDIMScheduler"), ("if", "EulerDiscreteScheduler")])
def test_compiled_step_matrix(family, scheduler, tmp_path):
    torch._dynamo.reset()
    _check(family, scheduler, tmp_path, compile="aot_eager")


def test_unsupported_configurations_are_clear_errors(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, kwargs = _build("sd", tmp_path)  # PNDM: not a capturable scheduler
    assert diffkern.patch(pipe, compile="eager").replaced["capturable_step"] == 1
    assert diffkern.patch(pipe, compile="eager").already["capturable_step"] == 1  # same options: kept
    with pytest.raises(ValueError, match="PNDMScheduler is not supported"):
        _images(pipe, kwargs, 2, 7.5)
    pipe.scheduler = _scheduler(pipe, "DDIMScheduler")
    with pytest.raises(ValueError, match="eta"):
        pipe(prompt="a cat", num_inference_steps=2, eta=0.5, height=32, width=32)
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe(prompt="a cat", num_inference_steps=2, guidance_rescale=0.7, height=32, width=32)
    assert not any(k in pipe.scheduler.__dict__ for k in ("step", "set_timesteps", "scale_model_input"))
    assert "forward" not in pipe.unet.__dict__  # the hooks live for one call only
    restored = diffkern.unpatch(pipe)
    assert restored.replaced["capturable_step"] == 1
    assert type(pipe).__name__ == "StableDiffusionPipeline" and not hasattr(type(pipe), "_diffkern_base")
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline is not supported"):
        diffkern.patch(img2img, compile=True)
    with pytest.raises(TypeError, match="pipeline"):
        diffkern.patch(pipe.unet, compile=True)


@pytest.mark.cuda
@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_cuda_graph_step_replays_without_stale_constants(scheduler, tmp_path):
    """On CUDA: the step captured once, replayed for every step of two calls with other step counts and
    guidance scales, gives the unpatched pipeline's images (fp32)."""
    pipe, kwargs = _build("sd", tmp_path)
    pipe = pipe.to("cuda")
    pipe.scheduler = _scheduler(pipe, scheduler)

    def images(steps, guidance):
        with torch.no_grad():
            return pipe(generator=torch.Generator("cuda").manual_seed(0), num_inference_steps=steps,
                        guidance_scale=guidance, **kwargs).images

    want = [images(*s) for s in SETTINGS]
    diffkern.patch(pipe, cuda_graphs=True)
    for s, expected in zip(SETTINGS, want):
        got = images(*s)
        assert np.abs(got - expected).max() < 1e-3, (scheduler, s)
    assert len(pipe._diffkern_capture.graphs) == len(SETTINGS)  # one capture per CFG / batch shape
