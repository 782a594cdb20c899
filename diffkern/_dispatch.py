"""Backend dispatch shared by every op family.

Each op family registers its backends. A backend says once whether it can run in this process at
all (`unavailable()`: extension not built, no Triton, no GPU) and, for a given call, every reason it
cannot take the inputs (`reasons(call)`). A call picks its backend by, in order:

1. the `backend=` argument of the op;
2. the innermost `diffkern.use_backend(...)` context;
3. the DIFFKERN_BACKEND environment variable;
4. the op's priority list for the input's device type (the fastest capable backend, by measured
   numbers written next to each list). On a GPU, a dispatch table measured on that device model
   (`dispatch-<device>.json`, written by benchmarks/gpu_suite.sh: per op and shape class the backends
   that passed the GPU tests, fastest first) goes before the op's own list; a device without a table
   keeps the op's safe list, and a table that cannot be read is ignored with a note that
   `python -m diffkern.info` shows (`dispatch_table_status`).

A backend named by 1-3 that cannot run raises ValueError with its reasons: no silent fallback.
When nothing in the priority list fits, the error lists every backend's reasons.

Names for 2 and 3: a single backend ("cpu") applies to every op that has a backend of that name and
is ignored by ops that do not; per-op names ("group_norm=cpu,attention=sdpa" or
`use_backend(group_norm="cpu")`) must name a backend the op has.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

ENV_VAR = "DIFFKERN_BACKEND"
TABLE_ENV_VAR = "DIFFKERN_DISPATCH_TABLES"  # a table file, or folders (os.pathsep-separated) holding them
TABLE_FORMAT = 1


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
    # (call) -> shape class name used by the dispatch tables ("*" rows apply to every class); None: "*" only
    shape_class: Callable[[Any], str] | None = None

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
    order = automatic_order(fam, call, device_type)
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


# ---------------------------------------------------------------------------------------------
# per-device dispatch tables (read lazily on the first automatic choice for a GPU tensor, cached)
#
# {"format": 1, "device": "NVIDIA H100 80GB HBM3", "source": "...", "ops": {
#    "attention": {"*": ["triton", "sdpa"], "d<=64": ["sdpa"]}, ...}}
# Per op: shape class -> backend names, fastest first (only backends that passed the GPU tests on that
# device). The op's own safe list follows the table's names, so the safe choice stays the last resort.


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the file-name form of a device name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _table_candidates(slug: str):
    """File names tried for a device, most specific first: every prefix of the slug down to two words
    ('nvidia-h100-80gb-hbm3', 'nvidia-h100-80gb', 'nvidia-h100')."""
    words = slug.split("-")
    return [f"dispatch-{'-'.join(words[:n])}.json" for n in range(len(words), min(2, len(words)) - 1, -1)]


def table_search_path() -> list:
    """Where tables are looked for: $DIFFKERN_DISPATCH_TABLES (files or folders), then the source tree's
    benchmarks/results (editable installs and checkouts)."""
    from pathlib import Path

    paths = [Path(p) for p in os.environ.get(TABLE_ENV_VAR, "").split(os.pathsep) if p]
    repo_results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    return paths + [repo_results]


def _device_name(device_type: str):
    """The current device's model name for device_type, None when there is none (or it is the CPU)."""
    if device_type != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return _cuda_name(torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _load_table(device_name: str):
    """(table dict or None, status note) for a device name; cached for the life of the process."""
    from pathlib import Path

    slug = device_slug(device_name)
    names = _table_candidates(slug)
    for where in table_search_path():
        files = [where] if where.is_file() else [where / n for n in names]
        for f in files:
            if not f.is_file():
                continue
            try:
                table = json.loads(Path(f).read_text())
                problems = _table_problems(table)
            except (OSError, ValueError) as e:
                problems = [f"unreadable: {type(e).__name__}: {e}"]
            if problems:
                return None, f"{f}: malformed dispatch table, ignored (safe choices kept): " + "; ".join(problems)
            return table, f"{f}: dispatch table for {table.get('device', device_name)!r}"
    return None, f"no dispatch table for {device_name!r} (looked for {names[-1]}...): safe choices"


def _table_problems(table) -> list:
    if not isinstance(table, dict):
        return ["the top level is not an object"]
    out = []
    if table.get("format") != TABLE_FORMAT:
        out.append(f"format {table.get('format')!r}, expected {TABLE_FORMAT}")
    ops = table.get("ops")
    if not isinstance(ops, dict):
        return out + ["'ops' is not an object"]
    for op, classes in ops.items():
        if not isinstance(classes, dict):
            out.append(f"ops.{op} is not an object")
            continue
        for cls, order in classes.items():
            if not (isinstance(order, list) and order and all(isinstance(n, str) for n in order)):
                out.append(f"ops.{op}.{cls} is not a non-empty list of backend names")
    return out


def reload_tables():
    """Forget the cached tables (after writing one, or in tests)."""
    _load_table.cache_clear()


def dispatch_table_status(device_type: str = "cuda") -> str:
    """One line on the dispatch table used for device_type in this process (shown by diffkern.info)."""
    name = _device_name(device_type)
    if name is None:
        return f"no {device_type} device: dispatch tables not consulted (safe choices)"
    return _load_table(name)[1]


def automatic_order(fam: OpFamily, call, device_type: str) -> list:
    """Backend names tried for an automatic choice: the device's table entry for this op and shape class
    (names the op does not have are skipped), then the op's safe priority list."""
    safe = list(fam.priority.get(device_type, []))
    name = _device_name(device_type)
    if name is None:
        return safe
    table = _load_table(name)[0]
    entry = (table or {}).get("ops", {}).get(fam.name)
    if not entry:
        return safe
    cls = fam.shape_class(call) if (fam.shape_class is not None and call is not None) else None
    chosen = entry.get(cls) if cls is not None and cls in entry else entry.get("*", [])
    front = [n for n in chosen if n in fam.backends]
    return front + [n for n in safe if n not in front]
