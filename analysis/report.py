#!/usr/bin/python3
"""Markdown report and plots from a quantlab results file (reads the HDF5 only; never re-runs).

    report.py RESULTS.h5 -o OUTDIR [--metric M]

Writes OUTDIR/report.md: a table of runs x summary metrics, then the per-slice values of one
metric (--metric, default out_rel_err when present, else the first summary metric) with their
confidence intervals; and one PNG per summary metric, OUTDIR/<metric>_vs_bits.png: the metric
against the weight bits of the last quant step with bits < 16 (params "quant.N.bits"), one
solid line per variant (algorithm pipeline + granularity/group size + scheme, + activation bits
when quantized), one dashed line per slice value of that variant, and the FP run (no step with
bits < 16) as a horizontal line. The y axis is logarithmic when the plotted values span more
than two decades. Runs with a training step (zeroqat) add OUTDIR/training_loss_vs_forwards.png:
held-out (and training-batch) loss against forward passes, one line per run.

File layout: see experiments/result_store.h. Strings are fixed-length UTF-8 (h5py returns bytes).
"""
import argparse
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import h5py  # noqa: E402
import numpy as np  # noqa: E402

FORMAT = "quantlab-results"
STEP_KEY = re.compile(r"^quant\.(\d+)\.(.+)$")


def text(v):
    """An attribute or cell as str (fixed-length strings come back as bytes)."""
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode("utf-8")
    return str(v)


def table_rows(ds):
    """A compound dataset as a list of dicts with decoded strings."""
    data = ds[()]
    names = data.dtype.names or ()
    rows = []
    for rec in data:
        row = {}
        for n in names:
            v = rec[n]
            row[n] = text(v) if data.dtype[n].kind == "S" else v.item()
        rows.append(row)
    return rows


class Run:
    def __init__(self, group):
        a = group.attrs
        self.run_id = text(a["run_id"])
        self.label = text(a["label"])
        self.status = text(a["status"])
        self.message = text(a["message"])
        self.order = int(a["order"])
        self.params = {r["key"]: r["value"] for r in table_rows(group["params"])}
        self.summary = {r["metric"]: r for r in table_rows(group["summary"])}
        self.slices = table_rows(group["slices"])
        # Older files have no numeric environment table.
        self.numeric_env = ({r["key"]: r["value"] for r in table_rows(group["numeric_env"])}
                            if "numeric_env" in group else {})
        # Only runs with a training step (zeroqat) have a per-step table.
        self.training = table_rows(group["training"]) if "training" in group else []

    @property
    def ok(self):
        return self.status == "ok"

    def steps(self):
        """Quant steps as {index: {key: value}} from the flattened params."""
        steps = {}
        for key, value in self.params.items():
            m = STEP_KEY.match(key)
            if m:
                steps.setdefault(int(m.group(1)), {})[m.group(2)] = value
        return dict(sorted(steps.items()))

    def quantized_step(self):
        """The last step whose weight bits are < 16, or None (an FP run)."""
        found = None
        for step in self.steps().values():
            try:
                bits = int(step.get("bits", "16"))
            except ValueError:
                continue
            if bits < 16:
                found = step
        return found

    def bits(self):
        step = self.quantized_step()
        return None if step is None else int(step["bits"])

    def variant(self):
        """Line identity: pipeline + the quantized step's granularity/group size/scheme (+ act)."""
        steps = self.steps()
        pipeline = "+".join(s.get("algorithm", "?") for s in steps.values())
        step = self.quantized_step() or {}
        parts = [pipeline]
        gran = step.get("granularity")
        if gran == "group" and "group_size" in step:
            parts.append("g" + step["group_size"])
        elif gran:
            parts.append(gran)
        if step.get("scheme"):
            parts.append(step["scheme"])
        act_bits = step.get("act.bits")
        if act_bits and act_bits.isdigit() and int(act_bits) < 16:
            parts.append("a" + act_bits)
        return " ".join(parts)


def load_runs(path):
    if not os.path.isfile(path):
        raise SystemExit(f"report.py: {path}: no such file")
    f = h5py.File(path, "r")
    fmt = f.attrs.get("format")
    if fmt is None or text(fmt) != FORMAT:
        raise SystemExit(f"report.py: {path}: not a quantlab results file")
    runs = [Run(g) for g in f["runs"].values()] if "runs" in f else []
    f.close()
    runs.sort(key=lambda r: r.order)
    return runs


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.4g}"


def md_cell(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(header, rows):
    out = ["| " + " | ".join(md_cell(h) for h in header) + " |",
           "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    out += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def first_seen(items):
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def summary_metrics(runs):
    return first_seen(m for r in runs for m in r.summary)


def slice_levels(runs, metric):
    """(slice_key, slice_value) pairs of `metric` other than the overall row, first-seen order."""
    return first_seen((s["slice_key"], s["slice_value"]) for r in runs for s in r.slices
                      if s["metric"] == metric and s["slice_key"] != "__all__")


def slice_value(run, metric, key, value):
    for s in run.slices:
        if s["metric"] == metric and s["slice_key"] == key and s["slice_value"] == value:
            return s
    return None


def write_markdown(path, runs, metric, plots, source):
    metrics = summary_metrics(runs)
    lines = [f"# quantlab report: {os.path.basename(source)}", "",
             f"{len(runs)} runs ({sum(r.ok for r in runs)} ok).", "", "## Summary metrics", ""]
    rows = []
    for r in runs:
        if r.ok:
            rows.append([r.label, r.status] + [fmt(r.summary[m]["value"]) if m in r.summary else "-"
                                               for m in metrics])
        else:
            rows.append([r.label, f"{r.status}: {r.message}"] + ["-"] * len(metrics))
    lines.append(md_table(["run", "status"] + metrics, rows))

    levels = slice_levels(runs, metric)
    lines += [f"## Slices: {metric}", ""]
    if not levels:
        lines += [f"No slice rows for '{metric}'.", ""]
    else:
        lines += ["Value [CI low, CI high] (bootstrap level per run: params slices.ci_level); "
                  "* marks a flagged slice (few units/tokens, imprecise, empty).", ""]
        header = ["run", "overall"] + [f"{k}={v}" for k, v in levels]
        rows = []
        for r in runs:
            if not r.ok:
                continue
            cells = [r.label]
            for k, v in [("__all__", "__all__")] + levels:
                s = slice_value(r, metric, k, v)
                if s is None:
                    cells.append("-")
                    continue
                flag = "*" if s["flags"] else ""
                cells.append(f"{fmt(s['value'])}{flag} [{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]")
            rows.append(cells)
        lines.append(md_table(header, rows))

    lines += numeric_env_section(runs)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
        lines.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def numeric_env_section(runs):
    """What the numbers depend on beyond the config: the keys every run shares, then those that
    differ between runs (fast-mode results are bitwise comparable only where they agree)."""
    envs = [r.numeric_env for r in runs if r.numeric_env]
    if not envs:
        return ["## Numeric environment", "", "Not recorded in this file.", ""]
    keys = first_seen(k for e in envs for k in e)
    shared = [k for k in keys if all(e.get(k) == envs[0].get(k) for e in envs)]
    lines = ["## Numeric environment", "",
             md_table(["key", "value (all runs)"], [[k, envs[0].get(k, "-")] for k in shared])]
    differing = [k for k in keys if k not in shared]
    if differing:
        lines += ["Differs between runs:", "",
                  md_table(["run"] + differing,
                           [[r.label] + [r.numeric_env.get(k, "-") for k in differing]
                            for r in runs if r.numeric_env])]
    return lines


def safe_name(s):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "metric"


def plot_metric(path, runs, metric):
    """metric vs bits; returns False when no quantized ok run has the metric."""
    ok = [r for r in runs if r.ok]
    quant = [r for r in ok if r.bits() is not None and metric in r.summary]
    if not quant:
        return False
    fp = next((r for r in ok if r.bits() is None and metric in r.summary), None)
    levels = slice_levels(runs, metric)

    # variant -> list of (bits, value); slices keyed by (variant, key, value).
    lines, dashed = {}, {}
    for r in quant:
        v = r.variant()
        lines.setdefault(v, []).append((r.bits(), r.summary[metric]["value"]))
        for k, val in levels:
            s = slice_value(r, metric, k, val)
            if s is not None:
                dashed.setdefault((v, k, val), []).append((r.bits(), s["value"]))

    values = [y for pts in list(lines.values()) + list(dashed.values()) for _, y in pts]
    if fp is not None:
        values.append(fp.summary[metric]["value"])
    pos = [y for y in values if y is not None and np.isfinite(y) and y > 0]
    log_y = len(pos) >= 2 and max(pos) / min(pos) > 100.0

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (variant, pts) in enumerate(lines.items()):
        c = colors[i % len(colors)]
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=c, label=variant)
        for j, (k, val) in enumerate(levels):
            spts = sorted(dashed.get((variant, k, val), []))
            if spts:
                ax.plot([p[0] for p in spts], [p[1] for p in spts], "--", color=c, alpha=0.7,
                        marker="xv^s+d"[j % 6], label=f"{variant} [{k}={val}]")
    if fp is not None:
        y = fp.summary[metric]["value"]
        if np.isfinite(y) and (y > 0 or not log_y):
            ax.axhline(y, color="black", linewidth=1, linestyle=":", label=f"FP ({fp.label})")
    if log_y:
        ax.set_yscale("log")
    bits = sorted({r.bits() for r in quant})
    ax.set_xticks(bits)
    ax.set_xlabel("weight bits")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs bits")
    ax.grid(True, which="both", alpha=0.3)
    # Outside the axes: with slices there are many entries and they would hide the lines.
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_training(path, runs):
    """Held-out loss against forward passes of the quantized model, one line per run with a
    training table (its label: estimator and parameter set), the training loss as a faint
    line beside it. Returns False when no run trained."""
    trained = [r for r in runs if r.ok and r.training]
    if not trained:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(trained):
        c = colors[i % len(colors)]
        ls = styles[(i // len(colors)) % len(styles)]
        # Sweep labels carry every zipped key; the schedule keys only clutter a legend.
        label = re.sub(r"\s*(eval_every|grad_check_every|steps)=\S+", "", r.label)
        held = [(t["forwards"], t["heldout_loss"]) for t in r.training
                if not math.isnan(t["heldout_loss"])]
        train = [(t["forwards"], t["train_loss"]) for t in r.training if not math.isnan(t["train_loss"])]
        if held:
            ax.plot([p[0] for p in held], [p[1] for p in held], ls, marker="o", color=c, markersize=3,
                    label=label)
        if train:
            ax.plot([p[0] for p in train], [p[1] for p in train], "-", color=c, alpha=0.25)
    ax.set_xlabel("forward passes of the quantized model")
    ax.set_ylabel("held-out loss (markers); training batches (faint)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="quantlab results file (.h5)")
    ap.add_argument("-o", "--output", required=True, help="output directory")
    ap.add_argument("--metric", help="metric for the per-slice table (default out_rel_err)")
    args = ap.parse_args(argv)

    runs = load_runs(args.results)
    if not runs:
        raise SystemExit(f"report.py: {args.results}: no runs stored")
    metrics = summary_metrics(runs)
    metric = args.metric or ("out_rel_err" if "out_rel_err" in metrics else
                             (metrics[0] if metrics else None))
    if metric is None:
        raise SystemExit(f"report.py: {args.results}: no summary metrics (did every run fail?)")
    known = set(metrics) | {s["metric"] for r in runs for s in r.slices}
    if metric not in known:
        raise SystemExit(f"report.py: unknown metric '{metric}'; available: "
                         + ", ".join(first_seen(list(metrics) + sorted(known - set(metrics)))))

    os.makedirs(args.output, exist_ok=True)
    plots = []
    for m in metrics:
        name = f"{safe_name(m)}_vs_bits.png"
        if plot_metric(os.path.join(args.output, name), runs, m):
            plots.append(name)
    if plot_training(os.path.join(args.output, "training_loss_vs_forwards.png"), runs):
        plots.append("training_loss_vs_forwards.png")
    write_markdown(os.path.join(args.output, "report.md"), runs, metric, plots, args.results)
    print(f"report: {os.path.join(args.output, 'report.md')} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
