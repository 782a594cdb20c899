"""Swap a pipeline's diffusers schedulers for diffkern's class of the same name and config."""

from __future__ import annotations


def diffkern_scheduler_class(name: str):
    """diffkern's scheduler class named `name` (diffusers' class name), or None."""
    import diffkern.schedulers as S

    registry = getattr(S, "SCHEDULERS", None)
    if isinstance(registry, dict):
        return registry.get(name)
    cls = getattr(S, name, None)
    return cls if isinstance(cls, type) else None


def is_diffusers_scheduler(obj) -> bool:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    return isinstance(obj, SchedulerMixin)


def is_diffkern_scheduler(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "diffkern" and hasattr(obj, "step")


def swap(scheduler):
    """(diffkern scheduler built from `scheduler.config`, None) or (None, why it was left)."""
    name = type(scheduler).__name__
    cls = diffkern_scheduler_class(name)
    if cls is None:
        return None, f"diffkern has no {name}"
    # built from every value of the config, the keys listed in `_use_default_values` included: a pipeline
    # may have edited the config after construction (StableDiffusionPipeline sets steps_offset=1 on old
    # configs, leaving the key in `_use_default_values`), and from_config would drop such a key and take
    # the class default instead of the value the unpatched scheduler runs with
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    try:
        new = cls.from_config(config)
    except Exception as e:  # a config value diffkern's class does not take: leave diffusers' scheduler
        return None, f"diffkern's {name} rejects this config: {type(e).__name__}: {e}"
    # then the config is made the original's: `_use_default_values` (the keys the user never set) carries
    # over, or `OtherScheduler.from_config(pipe.scheduler.config)` on the patched pipeline would take this
    # scheduler's defaults for them where the unpatched one takes OtherScheduler's own; and keys this class
    # does not take stay in its config as in diffusers' (e.g. clip_sample=False in SD's PNDM config must
    # reach a DDIMScheduler.from_config(pipe.scheduler.config) later)
    carried = {k: v for k, v in scheduler.config.items()
               if k not in new.config or (k == "_use_default_values" and new.config[k] != v)}
    if carried:
        new.register_to_config(**carried)
    # built fresh from the config: diffusers pipelines call set_timesteps at every __call__, so the
    # old scheduler's timestep state needs no carrying over
    return new, ""
