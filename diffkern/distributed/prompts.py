"""Prompt files -> jobs: one job per image, each with its own seed and sampling settings.

    prompts.txt     one prompt per line (blank lines are skipped)
    prompts.jsonl   one JSON object per line: {"prompt": "...", "seed": 7, "steps": 30, "guidance": 5.0,
                    "negative_prompt": "blurry", "height": 512, "width": 768}  (all but "prompt" optional;
                    "size": 512 or [512, 768] stands for height and width)

Seeds: image i (its index over the whole file, prompt-major: prompt p's k-th image is
p * num_images + k) gets seed + i, or, when its line sets "seed", that seed + k. So an image
depends on its own seed and settings only, not on the batch it ran in or on how many processes
ran: `diffkern generate --prompt P --seed S` redraws the image of seed S.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# per-line keys and their types; "size" is spelled out into height / width
LINE_KEYS = {"prompt": str, "seed": int, "steps": (int, str), "guidance": (int, float, type(None)),
             "negative_prompt": str, "height": int, "width": int}
SETTINGS = ("steps", "guidance", "height", "width")


@dataclass
class Job:
    """One image to make: its index (file name and seed), text, seed and sampling settings."""

    index: int
    prompt: str
    seed: int
    negative_prompt: str | None = None
    settings: dict = field(default_factory=dict)  # steps, guidance, height, width (None = the model's)
    line: int = 0  # 1-based line of the prompt file, for messages

    def batch_key(self):
        """Jobs with equal keys can share one pipeline call."""
        return tuple(sorted(self.settings.items()))


def read_prompts(path):
    """The prompt lines of a .txt or .jsonl file as dicts {"prompt": ..., "line": n, ...} (ValueError
    naming the file and line for a malformed one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    specs = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = raw.strip()
        if not text:
            continue
        specs.append(dict(_json_line(text, path, n) if jsonl else {"prompt": text}, line=n))
    if not specs:
        raise ValueError(f"{path}: no prompts in it")
    return specs


def _json_line(text, path, n):
    where = f"{path}:{n}"
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if isinstance(spec, str):
        spec = {"prompt": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a JSON object with a \"prompt\", got {type(spec).__name__}")
    spec = dict(spec)
    if "size" in spec:
        size = spec.pop("size")
        h, w = (size, size) if isinstance(size, int) else (tuple(size) if isinstance(size, list) and
                                                           len(size) == 2 else (None, None))
        if not (isinstance(h, int) and isinstance(w, int)):
            raise ValueError(f"{where}: \"size\" must be an int or [height, width], got {size!r}")
        spec.setdefault("height", h)
        spec.setdefault("width", w)
    unknown = sorted(set(spec) - set(LINE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(LINE_KEYS)}, size")
    if not isinstance(spec.get("prompt"), str):
        raise ValueError(f"{where}: needs \"prompt\": a string")
    for key, types in LINE_KEYS.items():
        value = spec.get(key)
        if key in spec and (not isinstance(value, types) or isinstance(value, bool)):
            raise ValueError(f"{where}: \"{key}\" has the wrong type ({value!r})")
    for key in ("height", "width"):
        if key in spec and spec[key] <= 0:
            raise ValueError(f"{where}: \"{key}\" must be positive, got {spec[key]}")
    steps = spec.get("steps")
    if isinstance(steps, int) and steps < 1:
        raise ValueError(f"{where}: \"steps\" must be at least 1, got {steps}")
    if isinstance(steps, str) and not steps.strip():
        raise ValueError(f"{where}: \"steps\" is an empty string")
    guidance = spec.get("guidance")
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"{where}: \"guidance\" must be a finite number, got {guidance!r}")
    if "seed" in spec and not -2 ** 63 <= spec["seed"] < 2 ** 63:
        raise ValueError(f"{where}: \"seed\" must fit in 64 bits (torch.Generator.manual_seed), got {spec['seed']}")
    return spec


def make_jobs(specs, *, seed=0, num_images=1, defaults=None, accepts=SETTINGS + ("negative_prompt",)):
    """One Job per image of each prompt spec (see read_prompts), prompt-major.

    defaults: the settings of lines that do not set them (e.g. {"steps": 50, "guidance": 7.5});
    accepts: the per-line keys the pipeline can vary (a line setting another one is a ValueError,
    so that nothing is silently ignored).
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images: expected a positive int, got {num_images!r}")
    defaults = dict(defaults or {})
    jobs = []
    for p, spec in enumerate(specs):
        spec = dict(spec) if isinstance(spec, dict) else {"prompt": spec}
        line = spec.pop("line", p + 1)
        refused = sorted(k for k in spec if k not in ("prompt", "seed") and k not in accepts)
        if refused:
            raise ValueError(f"prompt line {line}: this model does not take per-prompt {', '.join(refused)}")
        settings = {k: spec.get(k, defaults.get(k)) for k in SETTINGS if k in accepts}
        for k in range(num_images):
            index = p * num_images + k
            image_seed = spec["seed"] + k if "seed" in spec else seed + index
            jobs.append(Job(index, spec["prompt"], image_seed, spec.get("negative_prompt",
                                                                        defaults.get("negative_prompt")),
                            settings, line))
    return jobs


def make_batches(jobs, batch_size):
    """Consecutive jobs with equal settings, at most batch_size per batch, in index order. The same
    batches for any number of processes (they are then dealt to ranks), so that every image is
    computed in the same batch whatever the world size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    batches = []
    for job in sorted(jobs, key=lambda j: j.index):
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and last[0].batch_key() == job.batch_key():
            last.append(job)
        else:
            batches.append([job])
    return batches
