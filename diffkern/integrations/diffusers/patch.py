"""`patch(obj)` / `unpatch(obj)`: run an existing diffusers pipeline or model on diffkern's kernels.

What is replaced, and how it is undone (every replacement keeps what it replaced, so unpatch
restores the very same objects):

* attention: diffusers' default processors on every `Attention` module (AttnProcessor,
  AttnProcessor2_0, XFormersAttnProcessor and the three added-KV variants) are swapped, through
  the module's own `set_processor`, for `DiffkernAttnProcessor` / `DiffkernAttnAddedKVProcessor`.
  Other processors (IP-Adapter, custom diffusion, fused projections, sliced, ...) are left.
* norm: GroupNorm -> SiLU sites (see norms.py for the design and why).
* scheduler: each scheduler of a pipeline is swapped for diffkern's class of the same name, built
  from the same config; classes diffkern lacks are left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from diffkern.integrations.diffusers import norms, scheduler_swap
from diffkern.integrations.diffusers.processors import DiffkernAttnAddedKVProcessor, DiffkernAttnProcessor

KINDS = ("attention", "added_kv_attention", "resnet_norm_silu", "out_norm_silu", "scheduler", "capturable_step")


@dataclass
class PatchReport:
    """What `patch` / `unpatch` did.

    replaced: {kind: count} of what was replaced (restored, for unpatch) just now. Kinds:
        "attention" (processors of self / cross attention modules), "added_kv_attention",
        "resnet_norm_silu" (ResnetBlock2D blocks: norm1->SiLU and norm2(->scale-shift)->SiLU each),
        "out_norm_silu" (conv_norm_out -> conv_act), "scheduler".
    already: {kind: count} found already patched (patching twice is a no-op).
    left: [(kind, where, reason)] what was not replaced, and why.
    notes: other remarks (e.g. diffusers' attention dispatcher).
    """

    replaced: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    already: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    left: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        """How many things were replaced."""
        return sum(self.replaced.values())

    def __repr__(self):
        def counts(d):
            return ", ".join(f"{k}={v}" for k, v in d.items() if v) or "nothing"

        lines = [f"PatchReport(replaced: {counts(self.replaced)}"]
        if any(self.already.values()):
            lines.append(f"  already patched: {counts(self.already)}")
        if self.left:
            lines.append(f"  left ({len(self.left)}):")
            groups = {}  # one line per (kind, reason): a real pipeline repeats a reason hundreds of times
            for kind, where, why in self.left:
                groups.setdefault((kind, why), []).append(where)
            for (kind, why), places in groups.items():
                shown = ", ".join(places[:3]) + (f", ... ({len(places) - 3} more)" if len(places) > 3 else "")
                lines.append(f"    {kind} x{len(places)}: {why} [{shown}]")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines) + ")"


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise ImportError("diffkern.patch needs diffusers: pip install 'diffkern[diffusers]'") from e


def _components(obj):
    """([(name, module)], [(name, scheduler)], is_pipeline) of a pipeline or a module tree."""
    from diffusers import DiffusionPipeline

    if isinstance(obj, DiffusionPipeline):
        modules, schedulers = [], []
        for name, entry in obj.config.items():
            # components are registered as (library, class name); other keys are plain settings
            if name.startswith("_") or not isinstance(entry, (tuple, list)):
                continue
            value = getattr(obj, name, None)
            if isinstance(value, nn.Module):
                modules.append((name, value))
            elif value is not None and (scheduler_swap.is_diffusers_scheduler(value)
                                        or scheduler_swap.is_diffkern_scheduler(value)):
                schedulers.append((name, value))
        return modules, schedulers, True
    if isinstance(obj, nn.Module):
        return [("", obj)], [], False
    raise TypeError("patch: obj must be a diffusers pipeline (DiffusionPipeline) or a torch.nn.Module "
                    f"holding diffusers modules, got {type(obj).__name__}")


def _is_diffusers(m) -> bool:
    return type(m).__module__.split(".")[0] == "diffusers"


def _walk(modules):
    """(where, module) over every module once, named by its first path."""
    seen = set()
    for root, tree in modules:
        for name, m in tree.named_modules():
            if id(m) not in seen:
                seen.add(id(m))
                yield ".".join(p for p in (root, name) if p) or type(m).__name__, m


def _processor_kinds():
    import diffusers.models.attention_processor as ap

    plain = tuple(getattr(ap, n) for n in ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor")
                  if hasattr(ap, n))
    added = tuple(getattr(ap, n) for n in ("AttnAddedKVProcessor", "AttnAddedKVProcessor2_0",
                                           "XFormersAttnAddedKVProcessor") if hasattr(ap, n))
    return plain, added


def _patch_attention(attn, where, report, kinds):
    plain, added = kinds
    proc = attn.processor
    if isinstance(proc, DiffkernAttnProcessor):
        report.already["attention"] += 1
    elif isinstance(proc, DiffkernAttnAddedKVProcessor):
        report.already["added_kv_attention"] += 1
    elif type(proc) in plain or type(proc) in added:
        kind = "attention" if type(proc) in plain else "added_kv_attention"
        if kind == "attention" and attn.added_kv_proj_dim is not None:
            report.left.append((kind, where, f"{type(proc).__name__} on a module with added KV projections"))
            return
        new = DiffkernAttnProcessor() if kind == "attention" else DiffkernAttnAddedKVProcessor()
        attn._diffkern_saved_processor = proc
        attn.set_processor(new)
        report.replaced[kind] += 1
    else:
        why = f"processor {type(proc).__name__} has no diffkern equivalent"
        report.left.append(("attention", where, why))


_PROCESSOR_TUPLES = {"CROSS_ATTENTION_PROCESSORS": DiffkernAttnProcessor,
                     "ADDED_KV_ATTENTION_PROCESSORS": DiffkernAttnAddedKVProcessor}


def register_default_processors() -> None:
    """Let diffusers' `set_default_attn_processor()` accept diffkern's processors.

    diffusers' models (UNet2DConditionModel, AutoencoderKL, PriorTransformer, ControlNetModel, ...)
    reset attention with `set_default_attn_processor()`, which raises unless every processor's class
    is in the module-level tuple CROSS_ATTENTION_PROCESSORS (-> AttnProcessor) or
    ADDED_KV_ATTENTION_PROCESSORS (-> AttnAddedKVProcessor); each model module imports those tuples
    by name. diffkern's processors compute the same thing as AttnProcessor2_0 /
    AttnAddedKVProcessor2_0, so they are appended to the tuple of their kind in every loaded diffusers
    module that holds it (the tuples are used for that membership test only); called by `patch`, so
    modules imported later are covered by the next patch. Idempotent; importing diffkern does nothing
    of this.
    """
    import sys

    import diffusers.models.attention_processor  # noqa: F401 (the defining module is always covered)

    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("diffusers"):
            continue
        for attr, ours in _PROCESSOR_TUPLES.items():
            value = mod.__dict__.get(attr)
            if isinstance(value, tuple) and ours not in value:
                setattr(mod, attr, value + (ours,))


def _patch_norms(m, where, report):
    from diffusers.models.resnet import ResnetBlock2D

    if isinstance(m, ResnetBlock2D):
        if norms.is_patched_resnet(m):
            report.already["resnet_norm_silu"] += 1
            return
        why = norms.resnet_reasons(m)
        if why:
            report.left.append(("resnet_norm_silu", where, "; ".join(why)))
        else:
            norms.patch_resnet(m)
            report.replaced["resnet_norm_silu"] += 1
        return
    if norms.is_patched_out_norm(m):
        report.already["out_norm_silu"] += 1
        return
    why = norms.out_norm_reasons(m)
    if why is None:
        return
    if why:
        report.left.append(("out_norm_silu", where, "; ".join(why)))
    else:
        norms.patch_out_norm(m)
        report.replaced["out_norm_silu"] += 1


def _dispatcher_note(m, where, report):
    """Attention modules of the dispatcher era (AttentionModuleMixin, not Attention) are not patched."""
    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:
        return
    from diffusers.models.attention_processor import Attention

    if isinstance(m, AttentionModuleMixin) and not isinstance(m, Attention):
        why = (f"{type(m).__name__} calls diffusers' attention dispatcher: run it under "
               "diffkern.integrations.diffusers.attention_backend()")
        report.left.append(("attention", where, why))


def patch(obj, *, attention: bool = True, norm: bool = True, scheduler: bool = True, compile=False,
          cuda_graphs: bool = False) -> PatchReport:
    """Run a diffusers pipeline (or a module tree holding diffusers modules) on diffkern's kernels.

    Args:
        obj: a `diffusers.DiffusionPipeline` (every nn.Module component and every scheduler
            component is patched) or a `torch.nn.Module`.
        attention: swap the attention processors of diffusers `Attention` modules.
        norm: fuse GroupNorm -> SiLU sites (ResnetBlock2D, conv_norm_out -> conv_act).
        scheduler: swap pipeline schedulers for diffkern's of the same name and config.
        compile: run each denoising step (UNet + classifier-free guidance + scheduler update) as one
            `torch.compile(fullgraph=True)` graph: True (torch.compile's default backend), a backend
            name ("inductor", "aot_eager", ...) or a dict of torch.compile keyword arguments.
            Pipelines: StableDiffusionPipeline, StableDiffusionXLPipeline, IFPipeline; schedulers:
            DDIM (eta=0), Euler, DPM-Solver++ 1M/2M (see capturable.py); others raise when called.
        cuda_graphs: capture that step in a CUDA graph on its first call and replay it for every
            step (per-step coefficients are read on the device by a device-side step index). CUDA only.

    Returns:
        PatchReport. Images equal the unpatched pipeline's from the same generator (within
        float32 rounding). Patching twice is a no-op; `unpatch(obj)` restores everything.

    Raises:
        TypeError: obj is neither a pipeline nor a module, or holds no diffusers modules.
    """
    _require_diffusers()
    modules, schedulers, is_pipeline = _components(obj)
    walked = list(_walk(modules))
    if not is_pipeline and not any(_is_diffusers(m) for _, m in walked):
        raise TypeError("patch: expected a diffusers pipeline or a torch.nn.Module holding diffusers "
                        "modules (Attention, ResnetBlock2D, UNet2DConditionModel, AutoencoderKL, ...); "
                        f"{type(obj).__name__} holds none")
    if is_pipeline and not walked and not schedulers:
        raise TypeError(f"patch: the pipeline {type(obj).__name__} has no module or scheduler components")

    report = PatchReport()
    kinds = _processor_kinds()
    from diffusers.models.attention_processor import Attention

    if attention:
        register_default_processors()
    for where, m in walked:
        if attention and isinstance(m, Attention):
            _patch_attention(m, where, report, kinds)
        elif attention:
            _dispatcher_note(m, where, report)
        if norm:
            _patch_norms(m, where, report)
    if scheduler and schedulers:
        _patch_schedulers(obj, schedulers, report)
    if compile or cuda_graphs:
        if not is_pipeline:
            raise TypeError("patch: compile / cuda_graphs need a diffusers pipeline (the step spans the UNet and "
                            f"the scheduler), got {type(obj).__name__}")
        from diffkern.integrations.diffusers import capturable

        new = capturable.patch_pipeline(obj, compile=compile, cuda_graphs=cuda_graphs)
        (report.replaced if new is not None else report.already)["capturable_step"] += 1
    if any("dispatcher" in why for _, _, why in report.left):
        report.notes.append(DISPATCHER_NOTE)
    if attention:
        from diffkern.integrations.diffusers.dispatcher import dispatcher_unavailable

        absent = dispatcher_unavailable()
        if absent:
            report.notes.append(f"no diffkern route through diffusers' attention dispatcher: {absent}")
    return report


DISPATCHER_NOTE = ("diffusers' attention dispatcher names its backends in a closed Enum "
                   "(AttentionBackendName), so diffkern cannot be registered as a backend of its own name; "
                   "diffkern.integrations.diffusers.attention_backend() routes the 'native' backend through "
                   "diffkern for the duration of a with-block instead")


def _patch_schedulers(pipe, schedulers, report):
    saved = pipe.__dict__.setdefault("_diffkern_saved_schedulers", {})
    for name, s in schedulers:
        if scheduler_swap.is_diffkern_scheduler(s):
            if name in saved:
                report.already["scheduler"] += 1
            continue  # the caller's own diffkern scheduler: nothing to swap
        new, why = scheduler_swap.swap(s)
        if new is None:
            report.left.append(("scheduler", name, why))
            continue
        saved[name] = (s, new)
        entry = pipe.config[name]
        setattr(pipe, name, new)  # through DiffusionPipeline.__setattr__, which registers diffkern's module
        # model_index.json keeps naming diffusers' class: a saved patched pipeline loads with diffusers
        # alone (diffkern's scheduler has diffusers' class name and config, so it saves as diffusers')
        pipe.register_to_config(**{name: tuple(entry)})
        report.replaced["scheduler"] += 1


def unpatch(obj) -> PatchReport:
    """Undo `patch(obj)`: the original processors, modules and schedulers, the same objects.

    Returns a PatchReport whose `replaced` counts what was restored. Parts replaced by the user
    since patching (another processor, another scheduler) are kept as they are.
    """
    _require_diffusers()
    modules, schedulers, _ = _components(obj)
    report = PatchReport()
    for _, m in _walk(modules):
        saved = m.__dict__.pop("_diffkern_saved_processor", None)
        if saved is not None:
            if isinstance(m.processor, (DiffkernAttnProcessor, DiffkernAttnAddedKVProcessor)):
                kind = "attention" if isinstance(m.processor, DiffkernAttnProcessor) else "added_kv_attention"
                m.set_processor(saved)
                report.replaced[kind] += 1
        if norms.is_patched_resnet(m):
            norms.unpatch_resnet(m)
            report.replaced["resnet_norm_silu"] += 1
        elif norms.is_patched_out_norm(m):
            norms.unpatch_out_norm(m)
            report.replaced["out_norm_silu"] += 1
    if not isinstance(obj, nn.Module):
        from diffkern.integrations.diffusers import capturable

        report.replaced["capturable_step"] += int(capturable.unpatch_pipeline(obj))
    saved = obj.__dict__.pop("_diffkern_saved_schedulers", {}) if not isinstance(obj, nn.Module) else {}
    for name, (original, ours) in saved.items():
        if getattr(obj, name, None) is ours:
            setattr(obj, name, original)
            report.replaced["scheduler"] += 1
    return report
