"""Images and the manifest on disk: PNG with text chunks, atomic writes, per-rank logs merged once.

Every image is written to a temporary name and renamed, so a file that exists is complete (what
--resume relies on). Each rank appends the record of every image it wrote to its own log in
OUTDIR/.manifest/ and flushes it: a rank that dies loses nothing written. At the end rank 0
merges the records of all ranks (gathered over torch.distributed, so nodes need not share a
disk for it) with any earlier manifest.jsonl into a new manifest.jsonl.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.jsonl"
LOG_DIR = ".manifest"


def image_name(index):
    """File name of image `index` (zero-padded so that names sort in index order)."""
    return f"{index:06d}.png"


def record_for(job, meta, image_size=None):
    """The manifest record (and PNG text) of a job: its index, file, prompt, seed and settings plus the
    run's metadata (model, scheduler, diffkern version). Nothing rank- or time-dependent goes in, so the
    bytes of an image do not depend on which process wrote it."""
    rec = {"index": job.index, "file": image_name(job.index), "prompt": job.prompt, "seed": job.seed}
    if job.negative_prompt:
        rec["negative_prompt"] = job.negative_prompt
    rec.update(meta)
    rec.update({k: v for k, v in job.settings.items() if v is not None})
    if image_size is not None:
        rec["width"], rec["height"] = image_size
    return rec


def save_png(image, path, text):
    """Write a PIL image as PNG with `text` (a dict) in tEXt / iTXt chunks, atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def png_text(path):
    """The text chunks of a PNG written by save_png, as a dict of strings."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return dict(getattr(image, "text", {}))


class RankLog:
    """Append-only record log of one rank (OUTDIR/.manifest/rank-N.jsonl), flushed per record."""

    def __init__(self, outdir, rank):
        folder = Path(outdir) / LOG_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank}.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def append(self, record):
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self):
        self._file.close()


def read_records(path, *, bad=None):
    """Records of a manifest or rank log: the lines that are JSON objects with an int "index" and a str
    "file". Others (a torn last line of a rank killed mid-write, a corrupted or hand-edited manifest) are
    skipped; their 1-based line numbers are appended to `bad` when given."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if (isinstance(rec, dict) and isinstance(rec.get("index"), int) and not isinstance(rec["index"], bool)
                and rec["index"] >= 0 and isinstance(rec.get("file"), str) and rec["file"]
                and Path(rec["file"]).name == rec["file"]):
            records.append(rec)
        elif bad is not None:
            bad.append(n)
    return records


def merge_manifest(outdir, records):
    """Write OUTDIR/manifest.jsonl: the earlier manifest's records, then those in leftover rank logs
    (an interrupted run), then `records`, one per image index (later ones win), sorted by index, only
    for images that exist. Removes the rank logs it merged. Returns the merged records."""
    outdir = Path(outdir)
    merged, bad = {}, []
    logs = sorted((outdir / LOG_DIR).glob("rank-*.jsonl"))
    earlier = read_records(outdir / MANIFEST, bad=bad)
    if bad:
        import sys

        print(f"diffkern: {outdir / MANIFEST}: skipped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:10]))}"
              f"{', ...' if len(bad) > 10 else ''}); the new manifest keeps the readable records", file=sys.stderr)
    for rec in earlier + [r for log in logs for r in read_records(log)] + list(records):
        merged[rec["index"]] = rec
    kept = [merged[i] for i in sorted(merged) if (outdir / merged[i]["file"]).is_file()]
    tmp = outdir / f".{MANIFEST}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, outdir / MANIFEST)
    for log in logs:
        log.unlink(missing_ok=True)
    try:
        (outdir / LOG_DIR).rmdir()
    except OSError:
        pass
    return kept
