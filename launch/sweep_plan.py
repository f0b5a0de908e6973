"""The sweep's plan: points (config overrides), their grouping into tasks, and their results.

A *point* is one run of the sweep: a set of dotted config overrides (``client_lr``,
``corefed.beta``, ``seed``, ...) and the name of its run directory
(``<workdir>/client_lr=0.05,seed=1/``). :func:`make_points` builds them from a grid (the
product of its axes, each with every seed) or an explicit list, typing every value like the
config field it sets.

A *task* is what one worker runs: one point, or (``vectorize``) every point whose overrides
differ only in vectorizable keys (seed and float hyperparameters; see
:func:`fedjax_sim.launch.vectorized.is_vectorizable_key`), run as one compiled program.

On disk: the frozen plan ``<workdir>/sweep/plan.pkl`` (the base ConfigDict, the points and
the tasks; workers read it) with a readable ``plan.json``, and each finished point's
``<workdir>/<point>/result.json`` (status ``ok`` / ``diverged`` / ``failed``, mode, final
metrics). A point whose ``result.json`` has status ``ok`` or ``diverged`` and the same
overrides is finished: :func:`load_result` returns it and the sweep skips the point.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import itertools
import json
import os
import pickle
from typing import Any, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep: a name (its run directory) and its config overrides."""
  name: str
  overrides: dict


def _fmt(v: Any) -> str:
  return repr(v) if isinstance(v, float) else str(v)


def point_name(overrides: dict) -> str:
  """``client_lr=0.05,mu=0.0,seed=1``: the run directory name of a point."""
  name = ",".join(f"{k}={_fmt(v)}" for k, v in overrides.items())
  return name.replace("/", "_").replace(" ", "") or "base"


def get_key(cfg, key: str):
  """Value of a dotted key; raises KeyError naming the key."""
  node = cfg
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise KeyError(f"unknown config key '{key}'") from None
  return node


def coerce(cfg, key: str, value: Any) -> Any:
  """Converts ``value`` (a string from the command line, or a Python value) to the type of
  the config field ``key``.

  Raises:
    KeyError: ``key`` is not in the config.  ValueError: ``value`` does not parse as the
    field's type.
  """
  current = get_key(cfg, key)
  if isinstance(value, str) and not isinstance(current, str):
    if isinstance(current, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{key}={value!r}: expected true or false")
      return value.lower() in ("true", "1")
    if isinstance(current, int):
      return int(value)
    if isinstance(current, float):
      return float(value)
    if isinstance(current, (tuple, list)):
      return tuple(ast.literal_eval(value))
    if current is None:
      try:
        return ast.literal_eval(value)
      except (ValueError, SyntaxError):
        return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    return tuple(value)
  return value


def apply_overrides(cfg, overrides: dict):
  """A copy of ``cfg`` with the dotted keys set (types as the config's fields)."""
  from fedjax_sim.launch.experiment import complete_config
  out = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") \
      else pickle.loads(pickle.dumps(cfg))
  if "algorithm" in overrides:  # the method first: its knob sub-dict is completed for it
    out.algorithm = overrides["algorithm"]
  complete_config(out)
  for key, value in overrides.items():
    parent = out
    *path, last = key.split(".")
    for part in path:
      parent = parent[part]
    parent[last] = coerce(out, key, value)
  return out


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
  """``["client_lr=0.05,0.1", "mu=0,0.01"]`` -> ``{"client_lr": ["0.05", "0.1"], ...}``.

  A value list may also be written with ``;`` or ``|`` separators (for tuple values
  such as ``model_kwargs.hidden=(32,)|(64,64)``).

  Raises:
    ValueError: a spec that is not ``KEY=V1,V2,...``.
  """
  axes: dict[str, list[str]] = {}
  for spec in specs:
    if "=" not in spec:
      raise ValueError(f"--grid={spec!r}: expected KEY=V1,V2,...")
    key, vals = spec.split("=", 1)
    sep = "|" if "|" in vals else ";" if ";" in vals else ","
    values = [v.strip() for v in vals.split(sep) if v.strip()]
    if not key.strip() or not values:
      raise ValueError(f"--grid={spec!r}: expected KEY=V1,V2,...")
    axes[key.strip()] = values
  return axes


def make_points(cfg, grid: Optional[dict] = None, seeds: Optional[Sequence] = None,
                points: Optional[Sequence[dict]] = None,
                overrides: Optional[dict] = None) -> list[Point]:
  """The sweep's points: ``points`` (explicit) or the product of ``grid``, each with every seed.

  Values are converted to the config fields' types, so ``fedprox.mu=0`` is the float 0.0.

  Raises:
    KeyError: a key that is not in the config.  ValueError: a bad value.
  """
  base = dict(overrides or {})
  if points:
    combos = [dict(p) for p in points]
  else:
    grid = grid or {}
    keys = list(grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*[grid[k] for k in keys])]
  # Method knobs (``fedprox.mu``) exist once the config's knob sub-dict is completed for every
  # algorithm the sweep runs.
  from fedjax_sim.launch.experiment import complete_config
  cfg = cfg.copy_and_resolve_references()
  chosen = cfg.algorithm
  for name in {chosen, *(str(c["algorithm"]) for c in [base, *combos] if "algorithm" in c)}:
    cfg.algorithm = name
    complete_config(cfg)
  cfg.algorithm = chosen
  out, seen = [], set()
  seed_list = [int(s) for s in seeds] if seeds else [None]
  for combo in combos:
    for s in seed_list:
      ov = {k: coerce(cfg, k, v) for k, v in combo.items()}
      if s is not None:
        ov["seed"] = s
      name = point_name(ov)
      if name in seen:
        raise ValueError(f"point {name} appears twice in the sweep")
      seen.add(name)
      out.append(Point(name, {**{k: coerce(cfg, k, v) for k, v in base.items()}, **ov}))
  return out


def load_sweep_file(path: str) -> dict:
  """Imports a sweep file and returns its ``get_sweep()`` dict.

  Raises:
    FileNotFoundError: no such file.  ValueError: no ``get_sweep()``, or unknown entries.
  """
  spec = importlib.util.spec_from_file_location("fedjax_sim_sweep_file", path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"sweep file {path} not found")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_sweep"):
    raise ValueError(f"sweep file {path} has no get_sweep()")
  sweep = mod.get_sweep()
  unknown = set(sweep) - {"grid", "seeds", "points", "overrides", "config"}
  if unknown:
    raise ValueError(f"sweep file {path}: unknown entries {sorted(unknown)} (expected grid, "
                     "seeds, points, overrides, config)")
  return sweep


def load_config(spec: str, relative_to: Optional[str] = None):
  """``file.py[:arg]`` (a path, or a shipped config name such as ``fedavg_digits``; a
  relative path is also looked up next to ``relative_to``) -> its ``get_config(arg)``.

  Raises:
    FileNotFoundError: neither a path nor a shipped config (the message lists those).
  """
  from fedjax_sim.launch import configs
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    for cand in ([os.path.join(relative_to, path)] if relative_to else []) + [
        configs.path(path.removesuffix(".py"))]:
      if os.path.exists(cand):
        path = cand
        break
    else:
      shipped = sorted(f[:-3] for f in os.listdir(configs.CONFIG_DIR)
                       if f.endswith(".py") and f not in ("__init__.py", "base.py"))
      raise FileNotFoundError(f"config {spec!r} not found (a path, or one of "
                              f"{', '.join(shipped)})")
  modspec = importlib.util.spec_from_file_location("fedjax_sim_sweep_config", path)
  mod = importlib.util.module_from_spec(modspec)
  modspec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


# --------------------------------------------------------------------------- tasks


def plan_tasks(cfg, points: Sequence[Point], vectorize: bool) -> list[list[int]]:
  """Groups point indices into tasks: with ``vectorize``, points whose overrides differ
  only in vectorizable keys share a task."""
  from fedjax_sim.launch.vectorized import is_vectorizable_key
  if not vectorize:
    return [[i] for i in range(len(points))]
  groups: dict[Any, list[int]] = {}
  for i, p in enumerate(points):
    fixed = tuple(sorted((k, repr(v)) for k, v in p.overrides.items()
                         if not is_vectorizable_key(k, v)))  # v: typed as the config field
    groups.setdefault(fixed, []).append(i)
  return list(groups.values())


def plan_dir(workdir: str) -> str:
  """``<workdir>/sweep``: the plan, and the workers' logs."""
  return os.path.join(workdir, "sweep")


def write_plan(cfg, workdir: str, points: Sequence[Point], tasks: Sequence[Sequence[int]]):
  """Freezes the plan for the workers: ``plan.pkl`` (config, points, tasks) and ``plan.json``."""
  d = plan_dir(workdir)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "plan.pkl"), "wb") as f:
    # Plain dicts, not Point objects: a local worker runs fedjax_sim.launch.sweep as __main__.
    pickle.dump({"config": cfg, "points": [dataclasses.asdict(p) for p in points],
                 "tasks": [list(t) for t in tasks]}, f)
  with open(os.path.join(d, "plan.json"), "w") as f:
    json.dump({"points": [{"name": p.name, "overrides": _jsonable(p.overrides)} for p in points],
               "tasks": [list(t) for t in tasks]}, f, indent=2)


def read_plan(workdir: str):
  """``(config, points, tasks)`` of the plan :func:`write_plan` froze under ``workdir``."""
  with open(os.path.join(plan_dir(workdir), "plan.pkl"), "rb") as f:
    plan = pickle.load(f)
  return plan["config"], [Point(**p) for p in plan["points"]], plan["tasks"]


# --------------------------------------------------------------------------- results


def result_path(workdir: str, p: Point) -> str:
  return os.path.join(workdir, p.name, "result.json")


def read_result(workdir: str, p: Point) -> Optional[dict]:
  """A point's ``result.json`` as written (any status), or None."""
  path = result_path(workdir, p)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_result(workdir: str, p: Point) -> Optional[dict]:
  """A point's result if it finished (ok or diverged) with the same overrides."""
  res = read_result(workdir, p)
  if res is None:
    return None
  if res.get("status") not in ("ok", "diverged") or res.get("overrides") != _jsonable(p.overrides):
    return None
  return res


def _jsonable(x):
  return json.loads(json.dumps(x, default=list))


def write_result(workdir: str, p: Point, res: dict) -> None:
  """Writes ``result.json`` atomically (the point's name and overrides, then ``res``)."""
  path = result_path(workdir, p)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"point": p.name, "overrides": _jsonable(p.overrides), **res}, f, indent=2)
  os.replace(tmp, path)
