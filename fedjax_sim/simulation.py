"""The simulation loop: the ONE loop every caller runs.

Two layers:

* :func:`run_rounds` is the loop: call a compiled round function, check the
  result is finite, checkpoint, evaluate on a cadence, report progress. It
  knows nothing of configs, files or what an evaluation computes; the
  vmapped sweep (``fedjax_sim.launch.vectorized``: G runs in one program, a
  leading G axis on the state and metrics) calls it directly.
* :func:`simulate` runs one simulation of BUILT objects (algorithm, sampler,
  data) through :func:`run_rounds`: the initial state, the round program
  (built here, or a prebuilt ``make_round(seed=None)`` program shared by
  several runs), the engine's evaluation (or the caller's callback) and, with
  a ``workdir``, the run directory: ``config.json``, ``metrics.jsonl``, Orbax
  checkpoints, exact resume, ``plots.png``. The CLI
  (``fedjax_sim.launch.experiment.train_and_evaluate``), the experiment
  drivers and the examples call it.

The engine never imports the algorithm registry, the data pipeline or the
launch code; building from a config lives in :mod:`fedjax_sim.launch.experiment`.

:func:`compiled_round` and :func:`time_interleaved` are the timing harness
that ``bench/`` and the drivers' throughput measurements share (they time
round calls only: no evaluation, no checks).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import comm, evaluation, sampling
from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.checkpoint import Checkpointer
from fedjax_sim.checks import check_algorithm
from fedjax_sim.errors import ConfigError, DivergedError
from fedjax_sim.round import SimState, init_state, make_mesh, make_round, replicate


@dataclasses.dataclass
class Experiment:
  """Built objects of one run (``fedjax_sim.launch.experiment.build_experiment``).

  ``cfg`` is the run config they were built from; ``train_and_evaluate``
  passes its engine settings (seed, rounds, eval_every, ...) to :func:`simulate`.
  """
  cfg: Any
  data: Any  # fedjax_sim.data.FederatedData
  model: Any
  algorithm: FederatedAlgorithm
  sampler: sampling.Sampler
  mesh: Any


class LoopResult(NamedTuple):
  """What :func:`run_rounds` and :func:`simulate` return.

  Attributes:
    state: the final state (a SimState; with a vmapped step, leading axis G).
    history: the evaluation callback's results, in order (``None`` results
      are left out); for :func:`simulate` with a resumed run, the rows of
      ``metrics.jsonl`` up to the checkpoint come first.
    call_s: wall seconds of each round-function call (including fetching its
      metrics to the host); the first call includes compilation.
  """
  state: Any
  history: list
  call_s: list

  @property
  def train_s(self) -> float:
    """Seconds spent in round-function calls (evaluation and checkpoints excluded)."""
    return float(sum(self.call_s))


def _finite(tree) -> bool:
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return all(np.all(np.isfinite(x)) for x in leaves)


@jax.jit
def _all_finite(tree) -> jax.Array:
  """On device: True when every float in the pytree (server AND client state) is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def state_is_finite(state: SimState, metrics: dict) -> bool:
  """The default divergence test: the calls' ``loss`` [R] and every float of the server and
  client state are finite (the state is checked on device)."""
  return _finite(metrics.get("loss", 0.0)) and bool(_all_finite((state.server, state.clients)))


def _first_bad_round(metrics: dict, point: int, points: int, done: int, rpc: int) -> int:
  """The first round (1-based) of the last call whose loss is not finite; the call's first
  round when the loss is finite (the model is not) or absent."""
  loss = metrics.get("loss")
  if loss is None:
    return done - rpc + 1
  row = np.asarray(loss).reshape(points, -1)[point]
  return done - rpc + int(np.argmax(~np.isfinite(row))) + 1


def _raise_diverged(round_: int, point: int) -> None:
  raise DivergedError(f"training diverged: non-finite loss or model by round {round_}; lower "
                      "the learning rates.")


def run_rounds(step: Callable, state: Any, *, rounds: int, evaluate: Callable,
               rounds_per_call: int = 1, eval_every: Optional[int] = None,
               checkpoint_every: Optional[int] = None,
               checkpoint: Optional[Callable[[int, Any], None]] = None,
               start: Optional[int] = None, eval_initial: bool = True,
               is_finite: Optional[Callable] = state_is_finite,
               on_diverged: Callable[[int, int], None] = _raise_diverged,
               history: Optional[list] = None,
               progress: Optional[Callable[[int], None]] = None) -> LoopResult:
  """The simulation loop: rounds until ``rounds``, with checks, checkpoints and evaluations.

  Per call: ``state, metrics = step(state)`` (``rounds_per_call`` rounds);
  metrics are fetched to the host; ``is_finite`` is checked (a newly
  non-finite point calls ``on_diverged``); then, after round r,
  ``checkpoint(r, state)`` if ``r % checkpoint_every == 0`` or r is the last
  round, and ``evaluate(r, state, train_metrics)`` if ``r % eval_every == 0``
  or r is the last round, where ``train_metrics`` maps each metric to its
  values over every round since the previous evaluation (NumPy, float32
  [R] or [G, R]); and ``progress(rounds_per_call)``. Before the first call,
  ``evaluate(start, state, {})`` when ``eval_initial``.

  Args:
    step: ``state -> (state, metrics)``, e.g. ``lambda s: round_fn(s, data.train)`` of
      :func:`fedjax_sim.round.make_round`; metrics are arrays [R] (or [G, R]).
    state: the initial state (a SimState, or G stacked ones).
    rounds: the last round.
    evaluate: ``(round, state, train_metrics) -> row``; results other than
      ``None`` are collected in ``history``.
    rounds_per_call: rounds one ``step`` call runs (R); ``eval_every``,
      ``checkpoint_every`` and ``rounds - start`` must be multiples of it.
    eval_every: rounds between evaluations (default: every call).
    checkpoint_every: rounds between ``checkpoint`` calls (default: the last round only).
    checkpoint: ``(round, state) -> None``, e.g. ``Checkpointer.save``; called
      after the finite check, so a diverged state is never saved.
    start: the state's round (default ``int(state.round)``; pass it for G stacked states).
    eval_initial: evaluate the initial state first.
    is_finite: ``(state, metrics) -> bool`` or bool [G] (one per stacked run);
      None skips the check. Default: :func:`state_is_finite`.
    on_diverged: ``(first_bad_round, point) -> None``, called once per point
      that turns non-finite; it may raise (the default raises
      :class:`~fedjax_sim.errors.DivergedError`). The loop stops when no point
      is left finite.
    history: a list to append to (e.g. the rows of a resumed run).
    progress: called with ``rounds_per_call`` after each call.

  Returns:
    :class:`LoopResult` (final state, history, per-call seconds).

  Raises:
    ConfigError: a cadence that is not a multiple of ``rounds_per_call``.
    DivergedError: from the default ``on_diverged``.
  """
  rpc = rounds_per_call
  r = int(state.round) if start is None else int(start)
  eval_every = eval_every or rpc
  for what, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every or rpc),
                      ("rounds - start", max(rounds - r, 0))):
    if rpc < 1 or value % rpc:
      raise ConfigError(f"{what}={value} is not a multiple of rounds_per_call={rpc} (the rounds "
                        "one call runs); choose settings that are.")
  history = [] if history is None else history

  def record(row):
    if row is not None:
      history.append(row)

  if eval_initial:
    record(evaluate(r, state, {}))
  pending: list[dict] = []  # per-call training metrics since the last evaluation
  call_s: list[float] = []
  alive = None  # bool [G]: points still finite
  while r < rounds and (alive is None or alive.any()):
    t = time.perf_counter()
    state, metrics = step(state)
    metrics = jax.device_get(metrics)
    call_s.append(time.perf_counter() - t)
    r += rpc
    pending.append(metrics)
    if is_finite is not None:
      ok = np.atleast_1d(np.asarray(is_finite(state, metrics), bool))
      was = np.ones_like(ok) if alive is None else alive
      for g in np.flatnonzero(was & ~ok):
        on_diverged(_first_bad_round(metrics, int(g), ok.size, r, rpc), int(g))
      alive = was & ok
      if not alive.any():
        break
    if checkpoint is not None and (r == rounds or (checkpoint_every and
                                                   r % checkpoint_every == 0)):
      checkpoint(r, state)
    if r % eval_every == 0 or r == rounds:
      # Training metrics over every round since the last evaluation (the round axis is last).
      since = {k: np.concatenate([np.atleast_1d(m[k]) for m in pending if k in m], axis=-1)
               for k in pending[-1]}
      pending.clear()
      record(evaluate(r, state, since))
    if progress is not None:
      progress(rpc)
  return LoopResult(state, history, call_s)


def train_fields(train_metrics: dict, point: Optional[int] = None) -> dict[str, float]:
  """A metrics row's training fields: each metric's mean over the rounds since the last
  evaluation; client metrics get a ``train_`` prefix (``server/...``, ``padding...`` and
  ``useful...`` keep their names). ``point``: the run's index when metrics are [G, R]."""
  pick = (lambda v: v) if point is None else (lambda v: v[point])
  return {f"train_{k}" if not k.startswith(("server/", "padding", "useful")) else k:
          float(np.mean(pick(v))) for k, v in train_metrics.items()}


def simulate(algorithm: FederatedAlgorithm, sampler: Optional[sampling.Sampler], data: Any, *,
             seed: int, rounds: int, rounds_per_call: int = 1, eval_every: Optional[int] = None,
             checkpoint_every: Optional[int] = None, max_checkpoints: int = 3,
             chunk_size: Optional[int] = None, schedule: str = "chunked",
             slots: Optional[int] = None, mesh=None, round_fn: Optional[Callable] = None,
             train: Any = None, init: Optional[Callable[[SimState], SimState]] = None,
             evaluate: Optional[Callable] = None, eval_initial: bool = True,
             workdir: Optional[str] = None, resume: bool = False,
             config_json: Optional[str] = None, name: Optional[str] = None,
             progress: bool = False,
             diverged_hint: str = "; lower the learning rates.",
             row_extras: Optional[Callable[[int, Any], dict]] = None) -> LoopResult:
  """Runs one simulation of built objects (through :func:`run_rounds`).

  With a ``workdir``, writes ``config.json`` (``config_json``), ``metrics.jsonl``
  (one JSON object per evaluation), ``checkpoints/`` (Orbax, every
  ``checkpoint_every`` rounds and at the end) and ``plots.png``; ``None``
  writes nothing.

  Args:
    algorithm: the FederatedAlgorithm.
    sampler: the cohort sampler (None for model pools).
    data: the data; ``data.train`` is ClientData [C, N, ...]; the default
      evaluation also reads ``test``, ``test_x``, ``test_y`` (a
      ``fedjax_sim.data.FederatedData``), the plot title ``name``.
    seed: the run seed (init and round keys, :mod:`fedjax_sim.seeding`).
    rounds: rounds to run (in total, also when resuming).
    rounds_per_call: rounds fused in one call; lowered to the gcd with
      ``eval_every``, ``checkpoint_every`` (with a workdir) and ``rounds`` (and
      a resumed checkpoint's round) so calls line up with them.
    eval_every: rounds between evaluations (default: every call).
    checkpoint_every: rounds between checkpoints (default: the last round).
    max_checkpoints: checkpoints kept.
    chunk_size: clients vmapped together (``make_round``).
    schedule, slots: the client schedule (``make_round``: ``"chunked"``, ``"stream"`` with W =
      ``slots``, or ``"auto"``).
    mesh: the device mesh (default: all local devices).
    round_fn: a prebuilt ``make_round(algorithm, sampler, seed=None, mesh=mesh,
      rounds_per_call=rounds_per_call, ...)``, called ``round_fn(state, train,
      seed)``: runs of several seeds then share one compiled program. Its
      ``rounds_per_call`` must survive the gcd above. Default: built here for ``seed``.
    train: the training ClientData the rounds read (default ``data.train``;
      e.g. re-padded to an N shared by several runs).
    init: adjusts the initial state (e.g. a method's knobs in the server
      state); its result is placed replicated on the mesh.
    evaluate: ``(round, state, train_metrics) -> row dict`` (see
      :func:`run_rounds`). Default: the engine's evaluation (global test and
      per-client accuracy, ``evaluation.summarize``, or the algorithm's own
      ``evaluate``), the training metrics (:func:`train_fields`), communication
      counts and ``wall_s``.
    eval_initial: evaluate the initial state (round 0) first.
    workdir: the run directory (created), or None.
    resume: continue from the latest checkpoint in ``workdir``; reproduces an
      uninterrupted run exactly (cohorts and client keys depend only on (seed, round)).
    config_json: written to ``workdir/config.json``.
    name: the run's name for the progress bar and plot title (default ``algorithm.name``).
    progress: show a progress bar.
    diverged_hint: follows "... by round N" in the divergence error.
    row_extras: ``(round, state) -> dict`` of fields added to every evaluation row
      (e.g. the privacy spent by that round, ``dp_epsilon``).

  Returns:
    :class:`LoopResult`: final state, history (evaluation rows), per-call seconds.

  Raises:
    ConfigError: existing checkpoints without ``resume``; ``resume`` without a
      workdir; a prebuilt ``round_fn`` whose ``rounds_per_call`` does not fit.
    DivergedError: a non-finite loss or model; the last good checkpoint stays.
    CheckpointError: ``resume`` with no or an unreadable checkpoint.
    AlgorithmError: the algorithm breaks the contract (``check_algorithm``,
      run when the round function is built here).
  """
  main_process = jax.process_index() == 0  # multi-host: process 0 writes files
  train = data.train if train is None else train
  name = name or algorithm.name
  ckpt = metrics_path = None
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_checkpoints)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if not resume and ckpt.latest_round() is not None:
      raise ConfigError(f"{workdir} already holds checkpoints (round {ckpt.latest_round()}); "
                        "pass --resume to continue it or choose another --workdir.")
    if main_process and config_json is not None:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_json)
  elif resume:
    raise ConfigError("resume=True needs the run directory: pass workdir.")

  mesh = mesh or make_mesh()
  state = init_state(algorithm, sampler, train.num_clients, seed, mesh)
  if init is not None:
    state = replicate(init(state), mesh)
  if round_fn is None:
    check_algorithm(algorithm, state, train,
                    sampler.clients_per_round if sampler is not None else 2)
  history: list[dict] = []
  if resume:
    state = ckpt.restore(state)
    if os.path.exists(metrics_path):  # keep only what the checkpoint has seen
      with open(metrics_path) as f:
        history = [r for r in map(json.loads, f) if r["round"] <= int(state.round)]
    if main_process:
      print(f"Resumed from {ckpt.directory} at round {int(state.round)}.")
  start = int(state.round)
  if metrics_path is not None and main_process:
    with open(metrics_path, "w") as f:
      for r in history:
        f.write(json.dumps(r) + "\n")

  eval_every = eval_every or rounds_per_call
  rpc = math.gcd(rounds_per_call, eval_every, rounds,
                 checkpoint_every if ckpt is not None and checkpoint_every else rounds)
  if resume:  # a checkpoint saved under another cadence: keep calls aligned to it
    rpc = math.gcd(rpc, start) or rpc
  if round_fn is None:
    fn = make_round(algorithm, sampler, seed=seed, mesh=mesh, chunk_size=chunk_size,
                    rounds_per_call=rpc, schedule=schedule, slots=slots)
    step = lambda s: fn(s, train)
  else:
    if rpc != rounds_per_call:
      raise ConfigError(f"the prebuilt round_fn runs rounds_per_call={rounds_per_call} rounds "
                        f"per call, but eval_every={eval_every}, rounds={rounds} (and "
                        "checkpoint_every, a resumed round) need calls of "
                        f"{rpc}; build it with rounds_per_call={rpc}.")
    step = lambda s: round_fn(s, train, seed)

  if evaluate is None:
    evaluate = _engine_evaluation(algorithm, sampler, data, train, start)
  from tqdm.auto import tqdm
  bar = tqdm(total=rounds, initial=start, desc=name, unit="round",
             disable=not (progress and main_process), dynamic_ncols=True)

  def record(r, st, train_metrics):
    row = evaluate(r, st, train_metrics)
    if row is not None and row_extras is not None:
      row.update(row_extras(r, st))
    if row is not None and metrics_path is not None and main_process:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if row is not None and "test_accuracy" in row:
      bar.set_postfix(acc=f"{row['test_accuracy']:.3f}", loss=f"{row.get('train_loss', 0):.3f}")
    return row

  def diverged(round_, _):
    msg = f"training diverged: non-finite loss or model by round {round_}{diverged_hint}"
    if ckpt is not None:
      msg += f" Last good checkpoint: round {ckpt.latest_round()} in {ckpt.directory}."
    raise DivergedError(msg)

  try:
    result = run_rounds(step, state, rounds=rounds, rounds_per_call=rpc, eval_every=eval_every,
                        checkpoint_every=checkpoint_every if ckpt is not None else None,
                        checkpoint=ckpt.save if ckpt is not None else None, start=start,
                        eval_initial=eval_initial and not history, evaluate=record,
                        on_diverged=diverged, history=history, progress=bar.update)
  finally:
    bar.close()
    if ckpt is not None:
      ckpt.wait()
      ckpt.close()
  if workdir is not None and main_process:
    from fedjax_sim import plotting
    plotting.plot_history(result.history, os.path.join(workdir, "plots.png"),
                          title=f"{name} on {getattr(data, 'name', '')}")
  return result


def _engine_evaluation(algorithm: FederatedAlgorithm, sampler, data, train, start: int):
  """The default evaluation callback of :func:`simulate` (rows of ``metrics.jsonl``)."""
  evaluate = evaluation.make_evaluate(algorithm)
  # Poisson sampling: the expected cohort q C, not the padded bound K_max.
  counts = comm.round_comm(algorithm, train,
                           None if algorithm.pools else sampler.expected_cohort)
  t0 = time.time()

  def row_of(r, state, train_metrics):
    if algorithm.evaluate is not None:  # the algorithm's own metrics (e.g. SSL)
      row = {"round": r, **algorithm.evaluate(state.server, state.clients, data)}
    else:
      raw = evaluate(state.server, state.clients, data.test, data.test_x, data.test_y)
      row = {"round": r, **evaluation.summarize(raw, int(data.test_y.shape[0]))}
    row.update(train_fields(train_metrics))
    row.update(comm.comm_row(counts, r))
    row["wall_s"] = time.time() - t0 if r > start else 0.0
    return row

  return row_of


def compiled_round(experiment: Experiment, rounds_per_call: int = 1):
  """``[round_fn, state, train]`` of a built experiment, the round program compiled (for timing).

  The round function is ``make_round`` with the config's seed and chunk size
  on the experiment's mesh; the state has advanced ``rounds_per_call`` rounds
  (the compiling call), and :func:`time_interleaved` advances it further.
  """
  exp, cfg = experiment, experiment.cfg
  round_fn = make_round(exp.algorithm, exp.sampler, seed=cfg.seed, mesh=exp.mesh,
                        chunk_size=cfg.chunk_size or None, rounds_per_call=rounds_per_call,
                        schedule=cfg.get("schedule", "chunked"), slots=cfg.get("slots") or None)
  state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, cfg.seed, exp.mesh)
  state, _ = round_fn(state, exp.data.train)  # compile
  jax.block_until_ready(state)
  return [round_fn, state, exp.data.train]


def time_interleaved(fns: dict, repeats: int, rounds: int,
                     rounds_per_call: int) -> tuple[dict, dict]:
  """Wall and process-CPU ms/round per configuration, ``rounds`` rounds per repeat, in turn.

  Args:
    fns: name -> [round_fn, state, train] (:func:`compiled_round`; the states advance).
    repeats: samples per configuration.
    rounds: rounds per sample, a positive multiple of ``rounds_per_call``.
    rounds_per_call: rounds one call of every ``round_fn`` runs.

  Returns:
    ``(wall, cpu)``: name -> list of ``repeats`` samples (ms per round).

  Raises:
    ValueError: ``rounds`` is not a positive multiple of ``rounds_per_call``.
  """
  if rounds <= 0 or rounds % rounds_per_call:
    raise ValueError(f"rounds={rounds}: must be a positive multiple of {rounds_per_call} "
                     f"(each call runs {rounds_per_call} rounds), e.g. {5 * rounds_per_call}")
  wall, cpu = {m: [] for m in fns}, {m: [] for m in fns}
  for _ in range(repeats):
    for name, entry in fns.items():
      rf, st, d = entry
      t, c = time.perf_counter(), time.process_time()
      for _ in range(rounds // rounds_per_call):
        st, _ = rf(st, d)
      jax.block_until_ready(st)
      wall[name].append(1e3 * (time.perf_counter() - t) / rounds)
      cpu[name].append(1e3 * (time.process_time() - c) / rounds)
      entry[1] = st
  return wall, cpu
