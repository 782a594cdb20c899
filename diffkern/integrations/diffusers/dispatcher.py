"""diffkern behind diffusers' attention dispatcher (diffusers.models.attention_dispatch, >= 0.35).

The transformer models of diffusers (Flux, SD3, Wan, QwenImage, ...) call
`dispatch_attention_fn(query, key, value, ...)`, which looks the active backend up in
`_AttentionBackendRegistry`. That API cannot be extended cleanly: backend names are the closed
Enum `AttentionBackendName`, which `attention_backend(...)` and `set_attention_backend(...)` both
validate against, so no third-party name can be registered without mutating the Enum. What can be
done without touching diffusers' code is what `attention_backend` below does: for the duration of
the context it makes the "native" entry (diffusers' default, SDPA) run diffkern's attention op,
and restores the registry on exit. Like diffusers' own `attention_backend` context, it changes
class-level registry state, so it is not thread-safe. Processors given an explicit backend with
`set_attention_backend(...)` bypass the active backend and are unaffected.

    from diffkern.integrations.diffusers import attention_backend
    with attention_backend():
        image = flux_pipe(prompt).images[0]
"""

from __future__ import annotations

import contextlib

from diffkern import ops


def dispatcher_unavailable() -> str:
    """Why the installed diffusers has no usable attention dispatcher ("" when it has one)."""
    try:
        from diffusers.models import attention_dispatch as ad
    except ImportError:
        return "the installed diffusers has no diffusers.models.attention_dispatch (added in 0.35)"
    missing = [n for n in ("_AttentionBackendRegistry", "AttentionBackendName", "dispatch_attention_fn")
               if not hasattr(ad, n)]
    if missing:
        return f"diffusers.models.attention_dispatch lacks {missing}"
    if not hasattr(ad.AttentionBackendName, "NATIVE") or ad.AttentionBackendName.NATIVE not in \
            ad._AttentionBackendRegistry._backends:
        return "diffusers' attention dispatcher has no 'native' backend to route"
    return ""


def diffkern_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                       scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                       _parallel_config=None):
    """The dispatcher's backend contract on diffkern.ops.attention.

    query: (B, Sq, H, D); key, value: (B, Sk, H, D) (the dispatcher's layout, as diffusers'
    `_native_attention`); attn_mask: additive float or bool keep-mask broadcastable to
    (B, H, Sq, Sk), or (B, Sk) (reshaped to (B, 1, 1, Sk) as diffusers does). Returns (B, Sq, H, D).
    Dropout, log-sum-exp outputs, grouped-query heads and context parallelism are refused with
    a ValueError naming the argument (diffkern's op has none of them).
    """
    if dropout_p:
        raise ValueError(f"diffkern attention backend: dropout_p must be 0 (got {dropout_p})")
    if return_lse:
        raise ValueError("diffkern attention backend: return_lse=True is not supported")
    if _parallel_config is not None:
        raise ValueError("diffkern attention backend: context parallelism (_parallel_config) is not "
                         "supported")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"diffkern attention backend: key has {key.shape[2]} heads, query {query.shape[2]} "
                         "(grouped-query attention, enable_gqa, is not supported)")
    if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))
    out = ops.attention(q, k, v, attn_bias=attn_mask, causal=bool(is_causal), scale=scale)
    return out.permute(0, 2, 1, 3)


@contextlib.contextmanager
def attention_backend():
    """Context in which diffusers' dispatcher runs its "native" backend (the default) on diffkern.

    Raises RuntimeError naming what is missing when the installed diffusers has no dispatcher.
    """
    why = dispatcher_unavailable()
    if why:
        raise RuntimeError(f"diffkern attention_backend: {why}")
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry as reg

    native = AttentionBackendName.NATIVE
    saved_fn, saved_active = reg._backends[native], reg._active_backend
    reg._backends[native] = diffkern_attention  # same parameter names: _supported_arg_names stays right
    reg._active_backend = native
    try:
        yield
    finally:
        reg._backends[native] = saved_fn
        reg._active_backend = saved_active
