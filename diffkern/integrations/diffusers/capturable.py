"""A capturable denoising step for diffusers pipelines: UNet + classifier-free guidance + the scheduler
update as one function of device tensors, run under `torch.compile(fullgraph=True)` or captured in a
CUDA graph and replayed (`diffkern.patch(pipe, compile=...)` / `patch(pipe, cuda_graphs=True)`).

Why it can be one graph, and why a replay never reuses a constant of capture time:

* every step's scheduler coefficients are precomputed, after the pipeline's own `set_timesteps`, as
  float32 tables on the latents' device (`StepTables`), and the step reads row `idx` of them, `idx`
  being a 0-d int64 tensor on the device that the step advances itself. No Python number that changes
  from step to step (timestep, sigma, alpha, order of the multistep solver) enters the graph, so
  torch.compile compiles the step once per shape, and a CUDA graph reads the rows from static
  buffers that each pipeline call refills;
* the update is linear in the latents x, the guided model output e and, for DPM-Solver++ (2M), the
  previous data prediction x0_prev:  x0 = P x + Q e,  x_next = A x + B e + C x0_prev  (with the UNet
  input x / D); DDIM (eta = 0), Euler and DPM-Solver++ 1M / 2M are all of this form. Their branches
  (first-order first and last steps of 2M, the final alpha of DDIM, epsilon / v / sample prediction)
  are settled when the tables are built, on the host, once per pipeline call;
* nothing in the step reads a tensor value on the host (no .item(), no `if tensor`).

How it hooks into an unmodified diffusers pipeline (StableDiffusionPipeline,
StableDiffusionXLPipeline, IFPipeline; their denoising loops were read for this):
the pipeline's class becomes a subclass of the same name whose `__call__` notes the call's
guidance_scale / eta and, for the duration of the call only, wraps the scheduler's `set_timesteps`
(tables are built after it), `scale_model_input` (returns its input: the division runs in the
graph), `step` (returns the latents the graph computed) and the UNet's `forward` (runs the whole step
and returns the UNet's real output, so the pipeline's own guidance arithmetic and callbacks see what
they always saw). `diffkern.unpatch(pipe)` restores the class.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "IFPipeline")
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler")


class StepTables:
    """Per-step coefficients of one pipeline call, as device tensors of length num_steps.

    t: the UNet's timestep per step (the scheduler's own `timesteps`, same dtype); D: the UNet input
    is x / D (Euler's sqrt(sigma^2 + 1), else 1); x0 = P x + Q e; x_next = A x + B e + C x0_prev.
    `multistep` tells whether x0 / x0_prev are used at all (DPM-Solver++ 2M).
    """

    NAMES = ("t", "D", "A", "B", "C", "P", "Q")

    def __init__(self, kind, multistep, rows, timesteps, device):
        self.kind, self.multistep = kind, multistep
        self.num_steps = n = len(timesteps)
        # padded to a fixed capacity (64, or the next power of two): a call with another step count
        # has tables of the same shape, so a compiled step is reused as it is (the rows are data)
        self.capacity = cap = max(64, 1 << (n - 1).bit_length())
        self.t = torch.cat([timesteps, timesteps[-1:].expand(cap - n)]).to(device)
        for name in self.NAMES[1:]:
            row = rows[name] + [rows[name][-1]] * (cap - n)
            setattr(self, name, torch.tensor(row, dtype=torch.float64).to(device, torch.float32))

    def tensors(self):
        return tuple(getattr(self, n) for n in self.NAMES)


def _prediction_type(scheduler, allowed):
    pred = scheduler.config.get("prediction_type", "epsilon")
    if pred not in allowed:
        raise ValueError(f"capturable step: {type(scheduler).__name__} with prediction_type={pred!r} is not "
                         f"supported (supported: {', '.join(allowed)})")
    return pred


def _no(scheduler, **flags):
    for key, bad in flags.items():
        if scheduler.config.get(key, None) == bad:
            raise ValueError(f"capturable step: {type(scheduler).__name__} with {key}={bad!r} is not supported "
                             "(not linear in the latents; run the pipeline without compile / cuda_graphs)")


def _ddim_rows(s, eta):
    if eta != 0:
        raise ValueError(f"capturable step: DDIMScheduler with eta={eta} draws noise; only eta=0 is supported")
    _no(s, clip_sample=True, thresholding=True)
    pred = _prediction_type(s, ("epsilon", "sample", "v_prediction"))
    ac = s.alphas_cumprod.double()
    final = float(s.final_alpha_cumprod)
    stride = s.config.num_train_timesteps // s.num_inference_steps
    rows = {k: [] for k in StepTables.NAMES[1:]}
    for t in s.timesteps.tolist():
        t = int(t)
        a = float(ac[t])
        prev = t - stride
        ap = float(ac[prev]) if prev >= 0 else final
        sa, s1a, sap, s1ap = math.sqrt(a), math.sqrt(1 - a), math.sqrt(ap), math.sqrt(1 - ap)
        if pred == "epsilon":  # x0 = (x - s1a e) / sa, eps = e
            A, B = sap / sa, s1ap - sap * s1a / sa
        elif pred == "sample":  # x0 = e, eps = (x - sa e) / s1a
            A, B = s1ap / s1a, sap - s1ap * sa / s1a
        else:  # v: x0 = sa x - s1a v, eps = sa v + s1a x
            A, B = sap * sa + s1ap * s1a, s1ap * sa - sap * s1a
        for k, v in zip("DABCPQ", (1.0, A, B, 0.0, 0.0, 0.0)):
            rows[k].append(v)
    return "ddim", False, rows


def _euler_rows(s):
    pred = _prediction_type(s, ("epsilon", "v_prediction"))
    sig = s.sigmas.double().tolist()
    rows = {k: [] for k in StepTables.NAMES[1:]}
    for i in range(len(s.timesteps)):
        sigma, nxt = sig[i], sig[i + 1]
        dt, d = nxt - sigma, math.sqrt(sigma * sigma + 1)
        if pred == "epsilon":  # x0 = x - sigma e; derivative = (x - x0) / sigma = e
            A, B = 1.0, dt
        else:  # x0 = -sigma / d e + x / d^2; derivative = (x - x0) / sigma
            A, B = 1.0 + dt / sigma * (1.0 - 1.0 / (d * d)), dt / d
        for k, v in zip("DABCPQ", (d, A, B, 0.0, 0.0, 0.0)):
            rows[k].append(v)
    return "euler", False, rows


def _dpm_rows(s):
    cfg = s.config
    if cfg.algorithm_type != "dpmsolver++":
        raise ValueError(f"capturable step: DPMSolverMultistepScheduler algorithm_type={cfg.algorithm_type!r} "
                         "is not supported (only 'dpmsolver++')")
    if cfg.solver_order not in (1, 2):
        raise ValueError(f"capturable step: DPMSolverMultistepScheduler solver_order={cfg.solver_order} is not "
                         "supported (1 or 2)")
    _no(s, thresholding=True)
    pred = _prediction_type(s, ("epsilon", "sample", "v_prediction"))
    sig = s.sigmas.double().tolist()
    n = len(s.timesteps)

    def alpha_sigma(x):  # diffusers' _sigma_to_alpha_sigma_t (VP)
        a = 1.0 / math.sqrt(x * x + 1.0)
        return a, x * a

    rows = {k: [] for k in StepTables.NAMES[1:]}
    for i in range(n):
        a_s0, s_s0 = alpha_sigma(sig[i])
        a_t, s_t = alpha_sigma(sig[i + 1])
        if pred == "epsilon":  # x0 = (x - s_s0 e) / a_s0
            P, Q = 1.0 / a_s0, -s_s0 / a_s0
        elif pred == "sample":
            P, Q = 0.0, 1.0
        else:  # v: x0 = a x - s e
            P, Q = a_s0, -s_s0
        # exp(-h) = (s_t / a_t) / (s_s0 / a_s0); 0 for a final sigma of 0 (h = inf)
        e = (s_t / a_t) / (s_s0 / a_s0)
        lower_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                      or cfg.final_sigmas_type == "zero")
        first = cfg.solver_order == 1 or i == 0 or lower_final
        k0 = -a_t * (e - 1.0)  # coefficient of D0 = x0
        if first:  # x_t = (s_t / s_s0) x - a_t (e - 1) x0
            A_, cx0, cprev = s_t / s_s0, k0, 0.0
        else:
            a_s1, s_s1 = alpha_sigma(sig[i - 1])
            lam = lambda a, s_: math.log(a) - math.log(s_)  # noqa: E731
            h = lam(a_t, s_t) - lam(a_s0, s_s0) if s_t > 0 else math.inf
            h0 = lam(a_s0, s_s0) - lam(a_s1, s_s1)
            r0 = h0 / h
            if cfg.solver_type == "midpoint":  # - 0.5 a_t (e - 1) D1, D1 = (x0 - x0_prev) / r0
                k1 = -0.5 * a_t * (e - 1.0)
            elif cfg.solver_type == "heun":  # - a_t ((e - 1) / h + 1) D1
                k1 = a_t * ((e - 1.0) / h + 1.0)
            else:
                raise ValueError(f"capturable step: solver_type={cfg.solver_type!r} is not supported")
            A_, cx0, cprev = s_t / s_s0, k0 + k1 / r0, -k1 / r0
        # x_next = A_ x + cx0 (P x + Q e) + cprev x0_prev
        for k, v in zip("DABCPQ", (1.0, A_ + cx0 * P, cx0 * Q, cprev, P, Q)):
            rows[k].append(v)
    return "dpm++", cfg.solver_order == 2, rows


def step_tables(scheduler, device, *, eta=0.0) -> StepTables:
    """The coefficient tables of `scheduler` after its `set_timesteps` (diffusers' or diffkern's class)."""
    name = type(scheduler).__name__
    if getattr(scheduler, "timesteps", None) is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise RuntimeError(f"capturable step: {name}.set_timesteps has not been called")
    if name == "DDIMScheduler":
        kind, multistep, rows = _ddim_rows(scheduler, eta)
    elif name == "EulerDiscreteScheduler":
        kind, multistep, rows = _euler_rows(scheduler)
    elif name == "DPMSolverMultistepScheduler":
        kind, multistep, rows = _dpm_rows(scheduler)
    else:
        raise ValueError(f"capturable step: scheduler {name} is not supported (supported: "
                         f"{', '.join(SUPPORTED_SCHEDULERS)}); diffkern.unpatch(pipe) and patch without "
                         "compile / cuda_graphs to run it")
    return StepTables(kind, multistep, rows, scheduler.timesteps, device)


def denoise_step(unet, x, idx, t, D, A, B, C, P, Q, guidance, x0_prev, cond, *, cfg, channels, multistep):
    """One denoising step, a pure function of tensors (what torch.compile / a CUDA graph captures).

    x: the pipeline's UNet input before scaling (the latents, twice over with CFG); idx: 0-d int64 step
    index on the device; t..Q: StepTables rows; guidance: 0-d tensor; x0_prev: previous x0 (float32,
    used by multistep tables only); cond: the UNet's other keyword arguments.
    Returns (unet output, next latents, x0).
    """
    # rows are gathered with a 1-element index tensor: a 0-d index would be taken as a Python int by
    # dynamo (a specialisation, i.e. one graph per step value)
    i = idx.reshape(1)
    t, D, A, B, C, P, Q = (torch.index_select(tab, 0, i) for tab in (t, D, A, B, C, P, Q))
    out = type(unet).forward(unet, x / D.to(x.dtype), t, return_dict=False, **cond)[0]
    e = out[:, :channels] if out.shape[1] != channels else out  # learned variance (IF): eps half
    if cfg:
        uncond, text = e.chunk(2)
        e = uncond + guidance.to(e.dtype) * (text - uncond)
        lat = x[: x.shape[0] // 2]
    else:
        lat = x
    lat32, e32 = lat.to(torch.float32), e.to(torch.float32)
    nxt = A * lat32 + B * e32
    if multistep:
        x0 = P * lat32 + Q * e32
        nxt = nxt + C * x0_prev
    else:
        x0 = x0_prev
    return out, nxt.to(e.dtype), x0


class CapturedStep:
    """The engine a pipeline patched with compile / cuda_graphs carries (`pipe._diffkern_capture`)."""

    def __init__(self, base, compile=False, cuda_graphs=False):
        self.compile_kwargs = None
        if compile:
            if isinstance(compile, str):
                kw = {"backend": compile}
            elif isinstance(compile, dict):
                kw = dict(compile)
            elif compile is True:
                kw = {}
            else:
                raise TypeError(f"compile must be True, a backend name or a dict of torch.compile arguments, "
                                f"got {type(compile).__name__}")
            if kw.get("fullgraph") is False:
                raise ValueError("compile: fullgraph=False defeats the point (one graph per step); leave it out")
            kw["fullgraph"] = True
            self.compile_kwargs = kw
        self.cuda_graphs = bool(cuda_graphs)
        self.fn = torch.compile(denoise_step, **self.compile_kwargs) if compile else denoise_step
        if compile:
            # fill diffkern's backend-availability caches before tracing: filling them during the first
            # trace fails a dynamo guard on those caches and costs one more trace
            from diffkern import ops

            for op in ("attention", "group_norm"):
                ops.unavailable_reasons(op)
        self.graphs = {}  # cuda graph cache: key -> (graph, static inputs, static outputs)
        self.signature = inspect.signature(base.__call__)
        self.calls = 0  # pipeline calls run through the captured step
        self.steps = 0  # steps run through it (all calls)
        self._reset()

    def _reset(self):
        self.tables = self.idx = self.x0_prev = self.pending = self.latents = None
        self.call_args, self.filled = None, set()

    # -- per pipeline call ---------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, pipe, args):
        if args.get("guidance_rescale", 0.0):
            raise ValueError("capturable step: guidance_rescale > 0 is not supported (it reads a norm of the "
                             "guided output); call with guidance_rescale=0 or unpatch compile / cuda_graphs")
        scheduler, unet = pipe.scheduler, pipe.unet
        if type(scheduler).__name__ not in SUPPORTED_SCHEDULERS:
            raise ValueError(f"capturable step: scheduler {type(scheduler).__name__} is not supported (supported: "
                             f"{', '.join(SUPPORTED_SCHEDULERS)}); diffkern.unpatch(pipe) and patch without "
                             "compile / cuda_graphs to run it")
        self._reset()
        self.call_args = args
        saved = {name: scheduler.__dict__.get(name) for name in ("set_timesteps", "scale_model_input", "step")}
        saved_forward = unet.__dict__.get("forward")
        scheduler.set_timesteps = self._set_timesteps_hook(scheduler)
        scheduler.scale_model_input = self._scale_hook(scheduler)
        scheduler.step = self._step_hook(scheduler)
        unet.forward = self._unet_hook(pipe, unet)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    scheduler.__dict__.pop(name, None)
                else:
                    setattr(scheduler, name, value)
            if saved_forward is None:
                unet.__dict__.pop("forward", None)
            else:
                unet.forward = saved_forward
            self.calls += 1
            self._reset()

    def _set_timesteps_hook(self, scheduler):
        orig = scheduler.set_timesteps

        @functools.wraps(orig)
        def set_timesteps(*args, **kwargs):
            result = orig(*args, **kwargs)
            device = kwargs.get("device") or scheduler.timesteps.device
            self.tables = step_tables(scheduler, device, eta=float(self.call_args.get("eta", 0.0) or 0.0))
            self.idx = torch.zeros((), dtype=torch.int64, device=device)
            self.x0_prev, self.filled = None, set()
            return result

        return set_timesteps

    def _scale_hook(self, scheduler):
        orig = scheduler.scale_model_input

        @functools.wraps(orig)
        def scale_model_input(sample, *args, **kwargs):
            if self.tables is None:
                raise RuntimeError("capturable step: scale_model_input before set_timesteps")
            self.pending = sample  # the division by D runs inside the step
            return sample

        return scale_model_input

    def _step_hook(self, scheduler):
        orig = scheduler.step

        @functools.wraps(orig)
        def step(model_output, timestep, sample, *args, return_dict=True, **kwargs):
            if self.latents is None:
                raise RuntimeError("capturable step: scheduler.step without the UNet call of the captured step")
            if self.latents.shape != sample.shape:
                raise RuntimeError(f"capturable step: step got latents of shape {tuple(sample.shape)}, the captured "
                                   f"step computed {tuple(self.latents.shape)}")
            nxt, self.latents = self.latents, None
            if not return_dict:
                return (nxt,)
            from diffusers.schedulers.scheduling_utils import SchedulerOutput

            return SchedulerOutput(prev_sample=nxt)

        return step

    def _unet_hook(self, pipe, unet):
        def forward(sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kwargs):
            if args:
                raise TypeError("capturable step: pass the UNet's arguments after encoder_hidden_states by keyword")
            if self.pending is None or sample is not self.pending:
                raise RuntimeError("capturable step: the UNet input is not what scheduler.scale_model_input "
                                   "returned (this pipeline changes it in between; not supported)")
            self.pending = None
            g = self.call_args.get("guidance_scale", 1.0)
            cfg = getattr(pipe, "do_classifier_free_guidance", None)
            cfg = (g > 1.0) if cfg is None else bool(cfg)
            channels = sample.shape[1]
            cond = {"encoder_hidden_states": encoder_hidden_states, **kwargs}
            if cond.get("timestep_cond") is not None:
                raise ValueError("capturable step: timestep_cond (guidance-distilled UNets) is not supported")
            cond = {k: v for k, v in cond.items() if v is not None}
            if self.x0_prev is None:
                lat_shape = (sample.shape[0] // 2 if cfg else sample.shape[0],) + tuple(sample.shape[1:])
                self.x0_prev = torch.zeros(lat_shape, dtype=torch.float32, device=sample.device)
            guidance = torch.tensor(float(g), dtype=torch.float32, device=sample.device)
            static = dict(cfg=cfg, channels=channels, multistep=self.tables.multistep)
            if self.cuda_graphs:
                out, nxt = self._replay(unet, sample, guidance, cond, static)
            else:
                out, nxt, x0 = self.fn(unet, sample, self.idx, *self.tables.tensors(), guidance, self.x0_prev, cond,
                                       **static)
                self.x0_prev = x0
                self.idx = self.idx + 1
            self.latents = nxt
            self.steps += 1
            if not return_dict:
                return (out,)
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)

        return forward

    # -- CUDA graphs -----------------------------------------------------------------------------

    def _replay(self, unet, sample, guidance, cond, static):
        if sample.device.type != "cuda":
            raise RuntimeError(f"cuda_graphs=True: the pipeline runs on {sample.device}, not on a CUDA device")
        flat = sorted(_flatten(cond), key=lambda kv: kv[0])
        key = (tuple(sample.shape), sample.dtype, tuple((k, tuple(v.shape), v.dtype) for k, v in flat),
               tuple(sorted(static.items())), self.tables.kind)
        n = self.tables.capacity
        key = key + (n,)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(unet, sample, guidance, cond, static, flat)
            self.graphs[key] = entry
        s = entry["inputs"]
        if id(self.tables) not in self.filled:  # first step of this call: this call's tables, index 0, no x0
            for name, tab in zip(StepTables.NAMES, self.tables.tensors()):
                s[name].copy_(tab)
            s["idx"].zero_()
            s["x0_prev"].zero_()
            s["guidance"].copy_(guidance)
            self.filled.add(id(self.tables))
        s["x"].copy_(sample)
        for k, v in flat:
            s["cond"][k].copy_(v)
        entry["graph"].replay()
        out, nxt = entry["outputs"]
        return out.clone(), nxt.clone()

    def _capture(self, unet, sample, guidance, cond, static, flat):
        dev = sample.device
        inputs = {"x": sample.clone(), "idx": torch.zeros((), dtype=torch.int64, device=dev),
                  "guidance": guidance.clone(), "x0_prev": torch.zeros_like(self.x0_prev),
                  "cond": {k: v.clone() for k, v in flat}}
        for name, tab in zip(StepTables.NAMES, self.tables.tensors()):
            inputs[name] = tab.clone()  # static buffers, refilled from each call's tables

        def body():
            c = _unflatten(cond, inputs["cond"])
            return self.fn(unet, inputs["x"], inputs["idx"], *(inputs[n] for n in StepTables.NAMES),
                           inputs["guidance"], inputs["x0_prev"], c, **static)

        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up (pure: the state updates happen only in the captured graph)
                body()
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, nxt, x0 = body()
            inputs["x0_prev"].copy_(x0)
            inputs["idx"].add_(1)
        self.filled.discard(id(self.tables))  # the caller fills this call's rows and zeroes the state
        return {"graph": graph, "inputs": inputs, "outputs": (out, nxt)}


def _flatten(cond, prefix=""):
    for k, v in cond.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v
        else:
            raise TypeError(f"cuda_graphs=True: UNet argument {prefix}{k} is a {type(v).__name__}, not a tensor")


def _unflatten(cond, statics, prefix=""):
    return {k: _unflatten(v, statics, f"{prefix}{k}.") if isinstance(v, dict) else statics[f"{prefix}{k}"]
            for k, v in cond.items()}


class _CapturedCall:
    """Mixed in before a pipeline's own class (same name): `__call__` runs through the captured step."""

    def __call__(self, *args, **kwargs):
        engine = self.__dict__["_diffkern_capture"]
        base = type(self)._diffkern_base
        bound = engine.signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        with engine.run(self, dict(bound.arguments)):
            return base.__call__(self, *args, **kwargs)


_CLASSES = {}


def captured_class(base):
    """The subclass of pipeline class `base` with the captured `__call__` (same name, so save_pretrained
    writes the diffusers class name)."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (_CapturedCall, base), {"__module__": base.__module__, "__qualname__":
                                                         base.__qualname__, "_diffkern_base": base})
        _CLASSES[base] = cls
    return cls


def patch_pipeline(pipe, compile=False, cuda_graphs=False):
    """Put `pipe` on the captured step (see the module docstring): the new CapturedStep, or None when
    `pipe` already runs on one with the same options."""
    name = type(pipe).__name__
    base = getattr(type(pipe), "_diffkern_base", type(pipe))
    if base.__name__ not in SUPPORTED_PIPELINES or base.__module__.split(".")[0] != "diffusers":
        raise ValueError(f"compile / cuda_graphs: pipeline {name} is not supported (supported: "
                         f"{', '.join(SUPPORTED_PIPELINES)}, whose denoising loops were checked)")
    if cuda_graphs and not torch.cuda.is_available():
        raise RuntimeError("cuda_graphs=True needs a CUDA device (torch.cuda.is_available() is False)")
    old = pipe.__dict__.get("_diffkern_capture")
    if old is not None and old.options == (compile, bool(cuda_graphs)):
        return None  # already on the captured step with these options (its compiled graphs are kept)
    engine = CapturedStep(base, compile=compile, cuda_graphs=cuda_graphs)
    engine.options = (compile, bool(cuda_graphs))
    pipe.__dict__["_diffkern_capture"] = engine
    pipe.__class__ = captured_class(base)
    return engine


def unpatch_pipeline(pipe) -> bool:
    engine = pipe.__dict__.pop("_diffkern_capture", None)
    base = getattr(type(pipe), "_diffkern_base", None)
    if base is not None:
        pipe.__class__ = base
    return engine is not None
