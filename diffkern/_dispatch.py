"""Backend dispatch shared by every op family.

Each op family registers its backends. A backend says once whether it can run in this process at
all (`unavailable()`: extension not built, no Triton, no GPU) and, for a given call, every reason it
cannot take the inputs (`reasons(call)`). A call picks its backend by, in order:

1. the `backend=` argument of the op;
2. the innermost `diffkern.use_backend(...)` context;
3. the DIFFKERN_BACKEND environment variable;
4. the op's priority list for the input's device type (the fastest capable backend, by measured
   numbers written next to each list).

A backend named by 1-3 that cannot run raises ValueError with its reasons: no silent fallback.
When nothing in the priority list fits, the error lists every backend's reasons.

Names for 2 and 3: a single backend ("cpu") applies to every op that has a backend of that name and
is ignored by ops that do not; per-op names ("group_norm=cpu,attention=sdpa" or
`use_backend(group_norm="cpu")`) must name a backend the op has.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

ENV_VAR = "DIFFKERN_BACKEND"


@dataclass
class Backend:
    """One implementation of one op family.

    unavailable: () -> reason string, "" when usable in this process.
    reasons: (call) -> list of reasons this backend cannot take this call (empty: it can).
    run: the implementation; its signature is the op family's business.
    """

    name: str
    run: Callable[..., Any]
    unavailable: Callable[[], str]
    reasons: Callable[[Any], list]
    description: str = ""


@dataclass
class OpFamily:
    name: str
    backends: dict = field(default_factory=dict)
    # device type ("cpu", "cuda") -> backend names, fastest first
    priority: dict = field(default_factory=dict)

    def register(self, backend: Backend):
        self.backends[backend.name] = backend
        return backend

    def all_reasons(self, name: str, call) -> list:
        b = self.backends[name]
        why = b.unavailable()
        return [why] if why else list(b.reasons(call))


_OPS: dict = {}
_local = threading.local()


def op_family(name: str) -> OpFamily:
    if name not in _OPS:
        _OPS[name] = OpFamily(name)
    return _OPS[name]


def registered_ops():
    return sorted(_OPS)


def _family(op_name: str) -> OpFamily:
    if op_name not in _OPS:
        raise ValueError(f"op_name: unknown op {op_name!r}; known ops: {registered_ops()}")
    return _OPS[op_name]


def _parse_spec(spec: str, source: str) -> dict:
    """'cpu' -> {'*': 'cpu'}; 'group_norm=cpu,attention=sdpa' -> {...}."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" in part:
            op, _, name = part.partition("=")
            out[op.strip()] = name.strip()
        else:
            out["*"] = part
    if not out:
        raise ValueError(f"{source}: empty backend specification {spec!r}")
    return out


@contextlib.contextmanager
def use_backend(default: str | None = None, **per_op: str):
    """Context manager choosing backends for ops called inside it (thread-local, nestable).

    use_backend("reference") applies to every op that has a backend of that name;
    use_backend(group_norm="cpu") applies to one op. Inner contexts override outer ones.
    """
    spec = dict(per_op)
    if default is not None:
        spec["*"] = default
    if not spec:
        raise ValueError("use_backend: give a backend name or op_name=backend pairs")
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(spec)
    try:
        yield
    finally:
        stack.pop()


def _requested(fam: OpFamily, backend: str | None):
    """(name, source) of an explicitly requested backend, or (None, None)."""
    if backend is not None:
        if backend not in fam.backends:
            raise ValueError(f"backend: {fam.name} has no backend {backend!r}; choose from {sorted(fam.backends)}")
        return backend, "backend= argument"
    sources = [(s, "diffkern.use_backend context") for s in reversed(_local.__dict__.get("stack", []))]
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        sources.append((_parse_spec(env, ENV_VAR), f"{ENV_VAR}={env}"))
    for spec, source in sources:
        if fam.name in spec:
            name = spec[fam.name]
            if name not in fam.backends:
                raise ValueError(f"{source}: {fam.name} has no backend {name!r}; choose from {sorted(fam.backends)}")
            return name, source
        if spec.get("*") in fam.backends:
            return spec["*"], source
    return None, None


def select(op_name: str, call, device_type: str, backend: str | None = None) -> Backend:
    """The backend that runs `call` (see the module docstring for the order)."""
    fam = _family(op_name)
    name, source = _requested(fam, backend)
    if name is not None:
        why = fam.all_reasons(name, call)
        if why:
            raise ValueError(f"{op_name}: backend {name!r} (from {source}) cannot run this call: " + "; ".join(why))
        return fam.backends[name]
    order = fam.priority.get(device_type, [])
    collected = []
    for cand in order:
        why = fam.all_reasons(cand, call)
        if not why:
            return fam.backends[cand]
        collected.append(f"{cand}: " + "; ".join(why))
    for cand in sorted(set(fam.backends) - set(order)):
        collected.append(f"{cand}: not in the automatic priority list for {device_type} tensors")
    raise ValueError(f"{op_name}: no backend can run this call:\n  " + "\n  ".join(collected))


def available_backends(op_name: str) -> list:
    """Names of `op_name`'s backends usable in this process (whatever the inputs)."""
    fam = _family(op_name)
    return [n for n, b in fam.backends.items() if not b.unavailable()]


def unavailable_reasons(op_name: str) -> dict:
    """{backend name: why it is unusable in this process} for the unusable ones."""
    fam = _family(op_name)
    return {n: b.unavailable() for n, b in fam.backends.items() if b.unavailable()}
