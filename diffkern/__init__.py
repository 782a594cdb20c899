"""diffkern: fast, faithful kernels for text-to-image diffusion.

Importing diffkern compiles nothing, benchmarks nothing and changes no global state: the compiled
extension (diffkern._C) and Triton are loaded lazily, on the first call that needs them.

    import diffkern
    y = diffkern.ops.group_norm(x, 32, weight, bias, activation="silu")
    with diffkern.use_backend("reference"):
        ...
    python -m diffkern.info        # what was built and which backends each op can use here
"""

from diffkern._dispatch import use_backend
from diffkern import models, nn, ops, schedulers

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "schedulers", "use_backend", "__version__"]
