"""diffkern: fast, faithful kernels for text-to-image diffusion.

Importing diffkern compiles nothing, benchmarks nothing and changes no global state: the compiled
extension (diffkern._C) and Triton are loaded lazily, on the first call that needs them.

    import diffkern
    y = diffkern.ops.group_norm(x, 32, weight, bias, activation="silu")
    with diffkern.use_backend("reference"):
        ...
    python -m diffkern.info        # what was built and which backends each op can use here
    diffkern.patch(pipe)           # an existing diffusers pipeline on diffkern (needs diffusers)
"""

from diffkern._dispatch import use_backend
from diffkern import nn, ops

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "schedulers", "use_backend", "patch", "unpatch", "PatchReport",
           "__version__"]

_INTEGRATION = ("patch", "unpatch", "PatchReport")
_ON_DIFFUSERS = ("models", "schedulers")  # stand on diffusers' classes: imported on first use


def __getattr__(name):
    # models / schedulers and patch / unpatch / PatchReport are imported on first use, so that
    # `import diffkern` (ops, kernels, nn) works without diffusers installed and never imports it
    if name in _ON_DIFFUSERS:
        import importlib

        return importlib.import_module(f"diffkern.{name}")
    if name in _INTEGRATION:
        from diffkern.integrations import diffusers as integration

        return getattr(integration, name)
    raise AttributeError(f"module 'diffkern' has no attribute {name!r}")
