"""A sweep's summary: one row per point, ``summary.csv``, ``summary.md`` and two plots.

:func:`collect` reads every point's ``result.json`` into a row: ``point``, the swept
values, ``status`` (``ok`` / ``diverged`` / ``failed`` / ``missing``), ``mode``
(``single`` or ``vectorized[G]``), the final metrics row of the run, and the first line of
an ``error``. :func:`write_summary` writes

* ``summary.csv``: every column of every row (all final metrics, diagnostics included);
* ``summary.md``: the swept values, status and the metric columns of
  :func:`summary_metrics`, then (when several seeds ran) their mean ± sample std (ddof=1)
  over seeds of the ``ok`` points;
* ``summary_curves.png`` (``metric`` against round, mean over seeds) and
  ``summary_final.png`` (final ``metric`` against the first numeric swept key, ± std).

Metric columns of ``summary.md`` (:func:`summary_metrics`), unless a list is given
(``--summary_metrics``): the standard ones the runs log, in the order of
:data:`MD_METRICS` (with ``metric`` second when it is not one of them), then every other
numeric key of the runs' final metrics rows, sorted, that a method defines: for example
FedMuscle's ``delta_pct`` (Delta(%)). Not shown there (they stay in ``summary.csv``): keys
with a ``/`` (``comm/...`` counters, ``server/...`` diagnostics, per-pool metrics such as
``mlp_s/test_accuracy``), the wall time ``wall_s``, and the per-round diagnostics every run
logs (:data:`MD_SKIP`: spread and fairness of the client accuracies, padding statistics).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Optional, Sequence

from fedjax_sim.launch.sweep_plan import Point, point_name, read_result

TIMING_KEYS = ("wall_s", "train_time_s")

# The standard metric columns of summary.md, in this order, when the runs log them.
MD_METRICS = ("round", "test_accuracy", "test_loss", "client_acc_mean", "client_acc_worst10",
              "train_loss", "train_time_s")

# Diagnostics every run logs: in summary.csv, not among summary.md's automatic columns.
MD_SKIP = ("wall_s", "client_acc_std", "client_acc_var", "jain_index", "d_cosine",
           "d_manhattan", "padding_efficiency", "useful_examples")


def collect(workdir: str, points: Sequence[Point]) -> list[dict]:
  """One summary row per point: its overrides, status and final metrics."""
  rows = []
  for p in points:
    res = read_result(workdir, p)
    row = {"point": p.name, **p.overrides}
    if res is None:
      row["status"] = "missing"
    else:
      row.update(status=res["status"], mode=res.get("mode", ""),
                 **{k: v for k, v in res.get("metrics", {}).items()})
      if res.get("error"):
        row["error"] = res["error"].splitlines()[0][:200]
    rows.append(row)
  return rows


def _seed_groups(points: Sequence[Point], rows: Sequence[dict]):
  groups: dict[str, list[dict]] = {}
  for p, r in zip(points, rows):
    key = point_name({k: v for k, v in p.overrides.items() if k != "seed"})
    groups.setdefault(key, []).append(r)
  return groups


def _cell(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def summary_metrics(points: Sequence[Point], rows: Sequence[dict], metric: str = "test_accuracy",
                    keys: Optional[Sequence[str]] = None) -> list[str]:
  """The metric columns of ``summary.md`` (see the module docstring).

  Args:
    points: the sweep's points (their override keys are not metrics).
    rows: :func:`collect`'s rows.
    metric: the plots' metric; a column even when it is not a standard one.
    keys: an explicit list instead (those some row has, in this order).
  """
  if keys:
    return [k for k in keys if any(k in r for r in rows)]
  cols = [m for m in MD_METRICS if any(m in r for r in rows)]
  if metric not in cols and any(metric in r for r in rows):
    cols.insert(1, metric)
  not_metrics = {"point", "status", "mode", "error", *MD_SKIP, *cols}
  not_metrics |= {k for p in points for k in p.overrides}
  extra = sorted({k for r in rows for k, v in r.items()
                  if _number(v) and "/" not in k and k not in not_metrics})
  return cols + extra


def write_summary(workdir: str, points: Sequence[Point], rows: Sequence[dict],
                  metric: str = "test_accuracy",
                  md_metrics: Optional[Sequence[str]] = None) -> dict[str, str]:
  """Writes summary.csv, summary.md and the comparison plots; returns their paths.

  Args:
    workdir: the sweep directory.
    points: the sweep's points.
    rows: :func:`collect`'s rows, one per point.
    metric: the plots' metric.
    md_metrics: summary.md's metric columns (default: :func:`summary_metrics`'s choice).
  """
  import numpy as np
  from fedjax_sim.metrics import sample_std
  swept = list(dict.fromkeys(k for p in points for k in p.overrides))
  fixed = ["point", *swept, "status", "mode"]
  metric_keys = sorted({k for r in rows for k in r} - set(fixed) - {"error"})
  cols = fixed + metric_keys + ["error"]
  paths = {"csv": os.path.join(workdir, "summary.csv"), "md": os.path.join(workdir, "summary.md")}
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k, "") for k in cols})

  md_metrics = summary_metrics(points, rows, metric, md_metrics)
  lines = [f"# Sweep summary ({len(points)} points)", "",
           f"Run directories under `{os.path.abspath(workdir)}`.", "",
           "| " + " | ".join([*swept, "status", *md_metrics]) + " |",
           "|" + "---|" * (len(swept) + 1 + len(md_metrics))]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(k, "")) for k in [*swept, "status", *md_metrics])
                 + " |")
  groups = _seed_groups(points, rows)
  if "seed" in swept and any(len(g) > 1 for g in groups.values()):
    stats = [m for m in md_metrics if m not in ("round", "train_time_s")]
    lines += ["", "## Mean ± sample std (ddof=1) over seeds", "",
              "| config | seeds | " + " | ".join(stats) + " |",
              "|---|---|" + "---|" * len(stats)]
    for name, rs in groups.items():
      cells = []
      for m in stats:
        vals = np.array([r[m] for r in rs if r.get("status") == "ok" and m in r], float)
        cells.append(f"{vals.mean():.4g} ± {sample_std(vals):.2g}" if vals.size else "")
      lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  try:
    paths.update(_plots(workdir, points, rows, metric))
  except Exception as err:  # plots are a convenience; never lose the tables over them
    print(f"sweep: comparison plots failed ({type(err).__name__}: {err})", file=sys.stderr)
  return paths


def _plots(workdir, points, rows, metric) -> dict[str, str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from fedjax_sim.metrics import sample_std
  out = {}
  groups = _seed_groups(points, [dict(r, _dir=os.path.join(workdir, p.name))
                                 for p, r in zip(points, rows)])
  # Curves: metric against round, mean over seeds, one line per config.
  fig, ax = plt.subplots(figsize=(8, 5))
  for name, rs in groups.items():
    curves = []
    for r in rs:
      path = os.path.join(r["_dir"], "metrics.jsonl")
      if os.path.exists(path):
        with open(path) as f:
          hist = [json.loads(line) for line in f if line.strip()]
        curves.append({h["round"]: h.get(metric) for h in hist if h.get(metric) is not None})
    if not curves:
      continue
    rounds = sorted(set.intersection(*[set(c) for c in curves]))
    if rounds:
      mean = [np.mean([c[t] for c in curves]) for t in rounds]
      ax.plot(rounds, mean, label=name if len(groups) <= 20 else None)
  ax.set(xlabel="round", ylabel=metric, title=f"{metric} (mean over seeds)")
  ax.grid(alpha=0.3)
  if len(groups) <= 20:
    ax.legend(fontsize=7)
  fig.tight_layout()
  out["curves"] = os.path.join(workdir, "summary_curves.png")
  fig.savefig(out["curves"], dpi=100)
  plt.close(fig)

  # Final metric against the first numeric swept key, one line per other config.
  swept = [k for k in dict.fromkeys(k for p in points for k in p.overrides) if k != "seed"]
  numeric = [k for k in swept if all(isinstance(p.overrides.get(k), (int, float))
                                     and not isinstance(p.overrides.get(k), bool)
                                     for p in points)]
  fig, ax = plt.subplots(figsize=(8, 5))
  if numeric:
    x_key = numeric[0]
    lines: dict[str, dict[float, list]] = {}
    for p, r in zip(points, rows):
      if r.get("status") != "ok" or metric not in r:
        continue
      rest = point_name({k: v for k, v in p.overrides.items() if k not in (x_key, "seed")})
      lines.setdefault(rest, {}).setdefault(float(p.overrides[x_key]), []).append(r[metric])
    for rest, pts in lines.items():
      xs = sorted(pts)
      ax.errorbar(xs, [np.mean(pts[x]) for x in xs], yerr=[sample_std(pts[x]) for x in xs],
                  marker="o", capsize=3, label=rest if rest != "base" else None)
    xs_all = [float(p.overrides[x_key]) for p in points]
    if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
      ax.set_xscale("log")
    ax.set(xlabel=x_key)
    if len(lines) > 1 and len(lines) <= 20:
      ax.legend(fontsize=7)
  else:
    names = list(groups)
    vals = [[r[metric] for r in groups[n] if r.get("status") == "ok" and metric in r]
            for n in names]
    ax.bar(range(len(names)), [np.mean(v) if v else np.nan for v in vals],
           yerr=[sample_std(v) if v else 0 for v in vals], capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
  ax.set(ylabel=f"final {metric}", title=f"final {metric} (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out["final"] = os.path.join(workdir, "summary_final.png")
  fig.savefig(out["final"], dpi=100)
  plt.close(fig)
  return out
