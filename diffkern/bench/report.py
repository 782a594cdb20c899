"""What `diffkern bench` writes beside each suite's JSON and markdown: CSV, plots and the end-to-end table.

- CSV (`<stem>.csv`): one line per row, the JSON's fields flattened (extra.* columns).
- `<stem>-speedup.png`: speed-up over the reference per case (groups) and backend (bars), log scale.
- on a GPU, `<stem>-roofline.png`: each row's GB/s as % of the copy bandwidth measured in the same run,
  or its TFLOP/s as % of the measured fp16 matmul rate.
- `end_to_end_table(rows)`: per family the numbers users read (s/image, denoising it/s, peak memory).

matplotlib is optional: it is imported only when a plot is drawn (with the Agg backend, no display);
without it the plots are skipped and `plots_unavailable()` says why, the rest is written.

Redraw from results already written (e.g. the committed ones), the JSON being the one source:
    python -m diffkern.bench.report benchmarks/results/*.json --out benchmarks/results/plots
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path


def write_csv(rows, path):
    """rows (harness.Row) -> CSV with one column per field, extra.* flattened; returns the path."""
    dicts = [asdict(r) for r in rows]
    extra_keys = sorted({k for d in dicts for k in (d.get("extra") or {})})
    fields = [k for k in (dicts[0] if dicts else {}) if k != "extra"] + [f"extra.{k}" for k in extra_keys]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for d in dicts:
            extra = d.pop("extra", None) or {}
            w.writerow([_cell(d.get(k)) for k in fields if not k.startswith("extra.")] +
                       [_cell(extra.get(k)) for k in extra_keys])
    return Path(path)


def _cell(v):
    if isinstance(v, (tuple, list)):
        return "x".join(str(x) for x in v)
    if isinstance(v, float) and math.isnan(v):
        return ""
    return "" if v is None else v


def plots_unavailable():
    """None when matplotlib imports, else the reason (plots are then skipped)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"matplotlib not installed ({e}); pip install matplotlib for the plots"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: no display needed (CI, GPU boxes)
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(groups, title, xlabel, path, log=False, line=None, errors=None, panels=None):
    """groups: {case: {backend: value}} -> horizontal grouped bars at path (one row per case, so that
    suites with many cases stay readable: the figure grows in height, not width). errors: {case:
    {backend: (low, high)}} drawn as error bars. panels: more (groups, title, xlabel, errors) drawn
    side by side on the same cases."""
    plt = _pyplot()
    panels = [(groups, title, xlabel, errors)] + list(panels or [])
    cases = list(dict.fromkeys(c for g, *_ in panels for c in g))
    nb = max(len({b for g in p[0].values() for b in g}) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels) ** 0.5 + 2 * (len(panels) - 1),
                                                      1.6 + 0.22 * len(cases) * max(1.0, nb / 2)),
                             squeeze=False, sharey=True)
    for ax, (g, t, xl, err) in zip(axes[0], panels):
        _bars_on(ax, g, cases, err, log, line)
        ax.set_xlabel(xl)
        ax.set_title(t, fontsize=9, wrap=True)
    ax = axes[0][0]
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels(cases, fontsize=7)
    ax.invert_yaxis()  # first case on top, as in the tables
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _bars_on(ax, groups, cases, errors, log, line):
    backends = sorted({b for g in groups.values() for b in g})
    height = 0.8 / max(len(backends), 1)
    for k, b in enumerate(backends):
        ys = [i + (k - (len(backends) - 1) / 2) * height for i in range(len(cases))]
        vals = [groups.get(c, {}).get(b, float("nan")) for c in cases]
        xerr = None
        if errors:
            lo_hi = [(errors.get(c, {}).get(b) or (v, v)) for c, v in zip(cases, vals)]
            xerr = [[max(0.0, v - lo) if v == v else 0.0 for v, (lo, _) in zip(vals, lo_hi)],
                    [max(0.0, hi - v) if v == v else 0.0 for v, (_, hi) in zip(vals, lo_hi)]]
        ax.barh(ys, vals, height, label=b, xerr=xerr, error_kw=dict(elinewidth=0.8, capsize=2))
    if line is not None:
        ax.axvline(line, color="black", linewidth=0.8)
    if log:
        ax.set_xscale("log")
    if backends:
        ax.legend(fontsize=7, loc="best")
    ax.grid(axis="x", linewidth=0.3)


def _case_label(r):
    return f"{r.case} {r.dtype} {r.layout}".strip()


def plot_speedups(rows, path, title):
    """Speed-up over the reference (log scale; 1 = the reference) per case and backend, the quartiles
    of the per-round ratios as error bars, and beside it the speed-up over the best peer; unreliable
    rows have no bar. None when there is nothing to plot or no matplotlib."""
    groups, errors, peers = {}, {}, {}
    for r in rows:
        if r.backend != "reference" and r.speedup_vs_reference and r.speedup_vs_reference == r.speedup_vs_reference:
            groups.setdefault(_case_label(r), {})[r.backend] = r.speedup_vs_reference
            if r.speedup_iqr:
                errors.setdefault(_case_label(r), {})[r.backend] = tuple(r.speedup_iqr)
        if r.speedup_vs_best_peer and r.speedup_vs_best_peer == r.speedup_vs_best_peer and r.backend != "reference":
            peers.setdefault(_case_label(r), {})[r.backend] = r.speedup_vs_best_peer
    if not groups or plots_unavailable():
        return None
    skipped = sum(1 for r in rows if not r.reliable)
    note = f" ({skipped} unreliable rows not drawn)" if skipped else ""
    panels = [(peers, "over the best peer", "speed-up over the best peer (x)", None)] if peers else []
    return _grouped_bars(groups, title + note, "speed-up over the reference (x), bars: per-round IQR", path,
                         log=True, line=1.0, errors=errors, panels=panels)


def plot_roofline(rows, path, title, copy_gbps, matmul_tflops):
    """% of the measured copy bandwidth (rows with GB/s) or matmul rate (rows with TFLOP/s)."""
    groups = {}
    for r in rows:
        tf = (r.extra or {}).get("tflops")
        if r.gbps and copy_gbps:
            value = 100 * r.gbps / copy_gbps
        elif tf and matmul_tflops:
            value = 100 * tf / matmul_tflops
        else:
            continue
        groups.setdefault(_case_label(r), {})[r.backend] = value
    if not groups or plots_unavailable():
        return None
    ref = f"copy {copy_gbps:.0f} GB/s" + (f", fp16 matmul {matmul_tflops:.0f} TFLOP/s" if matmul_tflops else "")
    return _grouped_bars(groups, f"{title} ({ref})", "% of measured peak", path)


def write_reports(rows, out_dir, stem, device_type, copy_gbps=None, matmul_tflops=None):
    """CSV + plots for one suite; returns (paths, markdown lines linking them)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_csv(rows, out_dir / f"{stem}.csv")]
    md = [f"CSV: [{stem}.csv]({stem}.csv)"]
    plots = [plot_speedups(rows, out_dir / f"{stem}-speedup.png", f"{stem}: speed-up over the reference")]
    if device_type == "cuda":
        plots.append(plot_roofline(rows, out_dir / f"{stem}-roofline.png", stem, copy_gbps, matmul_tflops))
    why = plots_unavailable()
    if why:
        md.append(f"(plots skipped: {why})")
    for p in plots:
        if p is not None:
            paths.append(p)
            md += ["", f"![{p.stem}]({p.name})"]
    return paths, md


def write_index(suites, summary, env, out_dir, stem):
    """One markdown page linking every suite's table, CSV and plots, with the run's machine state and the
    targets' verdicts. suites: [(op, md path, json path, report paths, n rows, n unreliable)]."""
    out_dir = Path(out_dir)
    md = [f"# diffkern benchmarks: {env.get('device')} ({env.get('suite', '')} suite)", "",
          f"Command: `{env.get('command')}`; git {env.get('git_sha')}; {env.get('date')}; torch {env.get('torch')}, "
          f"triton {env.get('triton')}.", "",
          f"CPU {env.get('cpu_model')} ({env.get('cpu_count')} CPUs), load average at the start "
          f"{env.get('load_average')}. Rows whose spread (IQR / median) exceeds "
          f"{100 * env.get('spread_bound', timing_bound()):.0f}% are unreliable and print no speed-up.", "",
          "| suite | table | CSV | plots | rows | unreliable |", "|---|---|---|---|---|---|"]
    for op, md_path, json_path, paths, n, bad in suites:
        rel = lambda p: Path(p).name  # noqa: E731  (the index sits beside the suites' files)
        plots = " ".join(f"[{Path(p).stem.rsplit('-', 1)[-1]}]({rel(p)})" for p in paths if str(p).endswith(".png"))
        csvs = " ".join(f"[csv]({rel(p)})" for p in paths if str(p).endswith(".csv"))
        md.append(f"| {op} | [{rel(md_path)}]({rel(md_path)}) ([json]({rel(json_path)})) | {csvs} | {plots} | "
                  f"{n} | {bad} |")
    md += ["", "## Targets", ""]
    md += [f"- {'unreliable' if ok is None else 'met' if ok else 'MISSED'} ({op}): {text}" for op, text, ok in summary]
    for op, _, _, paths, _, _ in suites:
        md += ["", f"## {op}", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in paths if str(p).endswith(".png")]
    path = out_dir / f"{stem}.md"
    path.write_text("\n".join(md) + "\n")
    return path


def timing_bound():
    from diffkern.bench import timing

    return timing.SPREAD_BOUND


def end_to_end_table(rows):
    """Markdown: per family, size, steps and backend, s/image, denoising it/s and peak memory (rows of
    the end_to_end suite, whose `extra` holds these numbers)."""
    head = "| family | size | steps | backend | s / image | denoising it/s | peak memory | x reference |"
    out = [head, "|" + "---|" * 8]
    for r in rows:
        e = r.extra or {}
        if "s_per_image" not in e:
            continue
        peak = e.get("peak_mib")
        peak_s = "" if peak is None else f"{peak:.0f} MiB" + (" (RSS high-water)" if e.get("peak_is_rss") else "")
        ref = "" if r.speedup_vs_reference is None else f"{r.speedup_vs_reference:.2f}"
        out.append(f"| {e.get('family', r.case)} | {e.get('size', '')} | {e.get('steps', '')} | {r.backend} | "
                   f"{e['s_per_image']:.3f} | {e.get('denoise_it_s', float('nan')):.2f} | {peak_s} | {ref} |")
    return "\n".join(out)


def rows_from_json(path):
    """(rows as harness.Row, environment) of a results JSON written by diffkern.bench."""
    from diffkern.bench.harness import Row

    data = json.loads(Path(path).read_text())
    return [Row(**dict(r, shape=tuple(r["shape"]), **({"speedup_iqr": tuple(r["speedup_iqr"])}
                                                      if r.get("speedup_iqr") else {})))
            for r in data["rows"]], data.get("environment", {})


def main(argv=None):
    """Redraw CSV + plots for results JSON files; prints the markdown links per file."""
    p = argparse.ArgumentParser(prog="python -m diffkern.bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="results files written by diffkern.bench")
    p.add_argument("--out", default=None, help="folder for the CSV and plots (default: next to each file)")
    args = p.parse_args(argv)
    for name in args.json:
        rows, env = rows_from_json(name)
        device = "cpu" if str(env.get("device", "cpu")).lower().startswith("cpu") else "cuda"
        out = Path(args.out) if args.out else Path(name).parent
        _, md = write_reports(rows, out, Path(name).stem, device, env.get("copy_bandwidth_gbps"),
                              env.get("matmul_tflops_fp16"))
        print(f"{name}:\n  " + "\n  ".join(line for line in md if line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
