"""Lazy access to the compiled extension diffkern._C."""

import functools
import warnings


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from diffkern import _C
    except ImportError as e:  # not built, or built against another torch
        why = f"diffkern._C could not be imported ({e}); reinstall with `pip install --no-build-isolation .`"
        # said once, on first use (never at import): the reference/Triton backends still work
        warnings.warn(f"{why}. The compiled backends are unavailable; see `python -m diffkern.info`.",
                      RuntimeWarning, stacklevel=3)
        return None, why
    return _C, ""


def extension():
    """The compiled module, or None if it is not built (see `extension_error()`)."""
    return _load()[0]


def extension_error():
    """Why the extension is unavailable ("" when it loaded)."""
    return _load()[1]


@functools.lru_cache(maxsize=None)
def build_info():
    """How diffkern._C was built: {'cuda', 'cuda_version', 'cuda_archs', 'cpu_capability', 'torch_version'}."""
    ext = extension()
    return dict(ext.build_info()) if ext is not None else {}
