"""Lazy access to the compiled extension diffkern._C."""

import functools
import warnings


def cached(fn):
    """Memoise a function of hashable arguments (process-lifetime facts: what was built, what is
    installed). Plain Python rather than functools.lru_cache, because torch.compile traces through
    the dispatch that calls these and warns about every lru_cache wrapper it meets."""
    memo = {}

    @functools.wraps(fn)
    def wrapper(*args):
        if args not in memo:
            memo[args] = fn(*args)
        return memo[args]

    return wrapper


@cached
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


@cached
def build_info():
    """How diffkern._C was built: {'cuda', 'cuda_version', 'cuda_archs', 'cpu_capability', 'torch_version'}."""
    ext = extension()
    return dict(ext.build_info()) if ext is not None else {}
