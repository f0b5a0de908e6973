"""The loop (run_rounds: cadence, training metrics since the last evaluation, stacked runs
diverging one by one; simulate: one program for several seeds, no files without a workdir)
and end to end: resume == uninterrupted, bad input errors, divergence, CLI, 1 vs 8 devices."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import run_python
from fedjax_sim.checkpoint import Checkpointer
from fedjax_sim.errors import CheckpointError, ConfigError, DivergedError
from fedjax_sim.round import init_state, make_round
from fedjax_sim.simulation import run_rounds, simulate
from fedjax_sim.launch.experiment import build_experiment, train_and_evaluate


def _final_state(cfg, workdir):
  exp = build_experiment(cfg)
  template = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, cfg.seed, exp.mesh)
  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  state = ck.restore(template)
  ck.close()
  return state


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _counting_step(points=None, nan_at=None):
  """A stand-in round function: the state is the round count, 2 rounds per call, loss = the
  round's number ([G, 2] for ``points``); ``nan_at``: (round, point) whose loss is NaN."""
  def step(r):
    loss = np.array([r + 1, r + 2], np.float32)
    if points:
      loss = np.tile(loss, (points, 1))
    if nan_at is not None and r < nan_at[0] <= r + 2:
      loss[(nan_at[1], nan_at[0] - r - 1) if points else nan_at[0] - r - 1] = np.nan
    return r + 2, {"loss": loss}
  return step


def test_run_rounds_cadence_and_training_metrics_since_the_last_evaluation():
  ckpts = []
  res = run_rounds(_counting_step(), 0, rounds=10, rounds_per_call=2, eval_every=4,
                   checkpoint_every=6, start=0, is_finite=lambda s, m: True,
                   checkpoint=lambda r, s: ckpts.append((r, s)),
                   evaluate=lambda r, s, m: (r, s, m.get("loss", np.zeros(0)).tolist()))
  # Evaluations at 0, every 4 rounds and the last round; each sees every round since the last.
  assert res.history == [(0, 0, []), (4, 4, [1, 2, 3, 4]), (8, 8, [5, 6, 7, 8]),
                         (10, 10, [9, 10])]
  assert ckpts == [(6, 6), (10, 10)]
  assert res.state == 10 and len(res.call_s) == 5
  with pytest.raises(ConfigError, match="eval_every=3 is not a multiple of rounds_per_call=2"):
    run_rounds(_counting_step(), 0, rounds=10, rounds_per_call=2, eval_every=3, start=0,
               evaluate=lambda *a: None)


def test_run_rounds_stacked_runs_diverge_one_by_one():
  """G = 3 runs in one step: a run stops being evaluated or checkpointed from the round it
  turns non-finite; the loop ends when none is left."""
  diverged, rows, ckpts = [], [], []
  alive = lambda: [g for g in range(3) if g not in [p for _, p in diverged]]

  def evaluate(r, state, metrics):
    rows.append((r, alive(), metrics.get("loss", np.zeros((3, 0))).shape))

  finite = lambda state, m: np.isfinite(m["loss"]).all(axis=1) & ((np.arange(3) != 2) | (state < 6))
  res = run_rounds(_counting_step(points=3, nan_at=(3, 1)), 0, rounds=8, rounds_per_call=2,
                   start=0, evaluate=evaluate, is_finite=finite,
                   on_diverged=lambda r, g: diverged.append((r, g)),
                   checkpoint=lambda r, s: ckpts.append((r, alive())))
  assert diverged == [(3, 1), (5, 2)]  # point 2: finite loss, non-finite state -> first round
  assert rows == [(0, [0, 1, 2], (3, 0)), (2, [0, 1, 2], (3, 2)), (4, [0, 2], (3, 2)),
                  (6, [0], (3, 2)), (8, [0], (3, 2))]
  assert ckpts == [(8, [0])] and res.state == 8
  gone = []
  res = run_rounds(_counting_step(points=2), 0, rounds=8, rounds_per_call=2, start=0,
                   evaluate=lambda *a: None, is_finite=lambda s, m: np.array([s < 4, False]),
                   on_diverged=lambda r, g: gone.append((r, g)))
  assert gone == [(1, 1), (3, 0)] and res.state == 4 and len(res.call_s) == 2


def test_simulate_runs_seeds_through_one_program_and_writes_no_files(small_config, tmp_path,
                                                                      monkeypatch):
  monkeypatch.chdir(tmp_path)
  exp = build_experiment(small_config)
  kw = dict(rounds=4, rounds_per_call=2, eval_every=2, chunk_size=2, mesh=exp.mesh)
  shared = make_round(exp.algorithm, exp.sampler, seed=None, mesh=exp.mesh, chunk_size=2,
                      rounds_per_call=2)
  for seed in (0, 1):
    a = simulate(exp.algorithm, exp.sampler, exp.data, seed=seed, round_fn=shared, **kw)
    b = simulate(exp.algorithm, exp.sampler, exp.data, seed=seed, **kw)
    assert [r["round"] for r in a.history] == [r["round"] for r in b.history] == [0, 2, 4]
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.history[-1]["test_accuracy"], b.history[-1]["test_accuracy"],
                               atol=1e-3)
  assert shared._cache_size() == 1  # both seeds, one compiled program
  assert os.listdir(tmp_path) == []
  with pytest.raises(ConfigError, match="build it with rounds_per_call=1"):
    simulate(exp.algorithm, exp.sampler, exp.data, seed=0, round_fn=shared,
             **dict(kw, rounds=3))


def test_resumed_run_equals_uninterrupted(small_config, tmp_path):
  small_config.rounds = 6
  full = str(tmp_path / "full")
  train_and_evaluate(small_config, full)
  part = str(tmp_path / "part")
  small_config.rounds = 2  # "interrupted" after round 2 (its checkpoint)
  train_and_evaluate(small_config, part)
  small_config.rounds = 6
  train_and_evaluate(small_config, part, resume=True)
  a, b = _final_state(small_config, full), _final_state(small_config, part)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ra, rb = _rows(full), _rows(part)
  assert [r["round"] for r in ra] == [r["round"] for r in rb] == [0, 2, 4, 6]
  for x, y in zip(ra, rb):
    assert x["test_accuracy"] == y["test_accuracy"]
  assert os.path.exists(os.path.join(full, "plots.png"))
  assert json.load(open(os.path.join(full, "config.json")))["rounds"] == 6


def test_existing_checkpoints_need_resume(small_config, tmp_path):
  small_config.rounds = 2
  train_and_evaluate(small_config, str(tmp_path))
  with pytest.raises(ConfigError, match="--resume"):
    train_and_evaluate(small_config, str(tmp_path))


def test_resume_without_checkpoint_is_clear(small_config, tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint"):
    train_and_evaluate(small_config, str(tmp_path), resume=True)


def test_corrupt_checkpoint_is_clear_and_kept(small_config, tmp_path):
  small_config.rounds = 2
  train_and_evaluate(small_config, str(tmp_path))
  ckdir = tmp_path / "checkpoints" / "2"
  for root, _, files in os.walk(ckdir):
    for f in files:
      p = os.path.join(root, f)
      if os.path.getsize(p) > 0 and "metadata" not in f:
        with open(p, "wb") as fh:
          fh.write(b"garbage")
  small_config.rounds = 4
  with pytest.raises(CheckpointError, match="could not be restored"):
    train_and_evaluate(small_config, str(tmp_path), resume=True)
  assert ckdir.exists()


def test_diverged_run_stops_and_keeps_last_good_checkpoint(small_config, tmp_path):
  small_config.rounds = 2
  train_and_evaluate(small_config, str(tmp_path))  # good checkpoint at round 2
  small_config.rounds = 6
  small_config.client_lr = 1e30  # overflows to inf/NaN in the next call
  with pytest.raises(DivergedError, match="client_lr") as err:
    train_and_evaluate(small_config, str(tmp_path), resume=True)
  assert "Last good checkpoint: round 2" in str(err.value)
  ck = Checkpointer(str(tmp_path / "checkpoints"))
  assert ck.latest_round() == 2
  ck.close()
  state = _final_state(small_config, str(tmp_path))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.server))


@pytest.mark.parametrize("key,value,match", [
    ("data.alpha", 0.0, "alpha"),
    ("data.alpha", -0.5, "alpha"),
    ("clients_per_round", 50, "clients_per_round"),
    ("batch_size", 0, "batch_size"),
    ("algorithm", "fedfoo", "unknown algorithm"),
    ("data.dataset", "imagenet", "Unknown dataset"),
    ("client_lr", float("nan"), "client_lr"),
])
def test_bad_config_values_raise_clear_errors(small_config, key, value, match):
  node = small_config
  *path, leaf = key.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value
  with pytest.raises(Exception, match=match) as err:
    build_experiment(small_config)
  assert "\n" not in str(err.value)


def test_client_with_no_training_data_is_an_error(small_config):
  from fedjax_sim.data import PartitionError
  small_config.data.num_clients = 100
  small_config.data.partition = "quantity_skew"
  small_config.data.alpha = 0.01  # a few clients get nearly everything
  small_config.data.min_examples = 0
  with pytest.raises(PartitionError, match="client .* has no data") as err:
    build_experiment(small_config)
  assert "\n" not in str(err.value)


def test_cli_smoke_and_one_line_errors(tmp_path):
  exe = os.path.join(os.path.dirname(sys.executable), "fedjax-sim")
  base = [exe, "run", "--config.data.num_clients=20", "--config.clients_per_round=5",
          "--config.rounds=2", "--config.eval_every=2", "--config.progress=False"]
  ok = subprocess.run(base + [f"--workdir={tmp_path}/run"], capture_output=True, text=True,
                      timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "global test accuracy" in ok.stdout
  assert {"metrics.jsonl", "plots.png", "config.json", "checkpoints"} <= set(
      os.listdir(tmp_path / "run"))
  bad = subprocess.run(base + ["--config.data.alpha=0", f"--workdir={tmp_path}/bad"],
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("fedjax-sim: error: ")
  assert "alpha" in bad.stderr


ONE_VS_EIGHT = r"""
import jax, numpy as np
assert jax.device_count() == 8
from fedjax_sim.launch.configs.base import get_base_config
from fedjax_sim.round import init_state, make_mesh, make_round, replicate
from fedjax_sim.launch.experiment import build_experiment
c = get_base_config(); c.data.num_clients = 20; c.clients_per_round = 5; c.model_kwargs.hidden = (32,)
c.algorithm = "{alg}"
exp = build_experiment(c)
out = []
for n in (1, 8):
  mesh = make_mesh(n)
  state = init_state(exp.algorithm, exp.sampler, 20, 0, mesh)
  rf = make_round(exp.algorithm, exp.sampler, seed=0, mesh=mesh, rounds_per_call=2, chunk_size={chunk})
  state, m = rf(state, replicate(exp.data.train, mesh))
  out.append(state)
for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
print("OK", len(out[1].server.params["Dense_0"]["kernel"].sharding.device_set) if "{alg}" != "local" else 8)
"""


@pytest.mark.parametrize("alg,chunk", [("fedavg", "None"), ("local", "1"), ("fedmdfg", "2")])
def test_one_device_equals_eight_devices(alg, chunk):
  """fedmdfg: the line search's second client phase runs sharded too."""
  out = run_python(ONE_VS_EIGHT.format(alg=alg, chunk=chunk), devices=8)
  assert out.strip().startswith("OK")
