"""The streaming schedule (fedjax_sim/stream.py): clients stream through W vmapped slots.

For fedavg, fedprox, local, scaffold (per-client control variates, stacked uploads), qffl
(its loss at the global model is a ``prepare`` step, run once per queued client) and
fedavg_pools (one queue per model pool) (step-form algorithms,
``FederatedAlgorithm.local`` / ``Pool.local``; fedadam, fedyogi and fedadagrad are fedavg's
constructor with another server optimizer)
on the registry test's tiny experiment (12 digits clients, K = 5, MLP(16), B = 10, E = 1),
3 rounds of ``make_round(..., schedule="stream", slots=W)`` for W in {1, 3} (and, for fedavg, W = 8 > K,
capped at K) equal the per-client reference loop (:mod:`fedjax_sim.reference`, fed the
size-sorted order the stream queues) and the chunked schedule, to the registry test's
tolerance (float32 rounding: vmapped vs single-client matmuls). Algorithms without a step-form
client update (or a pool without one) raise a one-line ValueError; 1 device equals 8 forced
devices; the running weighted mean equals the stacked uploads.
"""
import jax
import numpy as np
import pytest

from test_registry_equivalence import (CHUNK, NUM_CLIENTS, ROUNDS, assert_close,
                                       experiment_config, moved)
from fedjax_sim.protocol import LocalSpec, client_update_from_local
from fedjax_sim.reference import make_reference_round
from fedjax_sim.round import init_state, make_round
from fedjax_sim.launch.experiment import build_experiment

SLOTS = (1, 3, 8)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "local", "fedavg_pools", "scaffold",
                                  "qffl"])
def test_stream_equals_reference_and_chunked(name):
  exp = build_experiment(experiment_config(name))
  alg, sampler, data = exp.algorithm, exp.sampler, exp.data.train
  specs = [p.local for p in alg.pools] if alg.pools else [alg.local]
  assert all(isinstance(s, LocalSpec) for s in specs)
  state0 = init_state(alg, sampler, NUM_CLIENTS, seed=0, mesh=exp.mesh)
  ref = make_reference_round(alg, sampler, seed=0, sort_by_size=True)
  chunked = make_round(alg, sampler, seed=0, mesh=exp.mesh, chunk_size=CHUNK, donate=False)
  want, ch = [state0], [state0]
  for _ in range(ROUNDS):
    want.append(ref(want[-1], data)[0])
    ch.append(chunked(ch[-1], data)[0])
  # W = 8 > K = 5 (capped at K: one wave, plain vmap) once, on fedavg; W = 1 and 3 everywhere.
  for w in SLOTS if name == "fedavg" else SLOTS[:2]:
    streamed = make_round(alg, sampler, seed=0, mesh=exp.mesh, schedule="stream", slots=w,
                          donate=False)
    got = state0
    for r in range(ROUNDS):
      got, metrics = streamed(got, data)
      for other, what in ((want[r + 1], "reference"), (ch[r + 1], "chunked")):
        assert_close(got.server, other.server, name, f"W={w} round {r} server vs {what}: ")
        assert_close(got.clients, other.clients, name, f"W={w} round {r} clients vs {what}: ")
        assert_close(got.sampler, other.sampler, name, f"W={w} round {r} sampler vs {what}: ")
      eff = float(metrics["padding_efficiency"][0])
      assert 0.0 < eff <= 1.0
      assert np.isfinite(metrics["loss"]).all()
    if w == 1:  # one slot runs no padded slot-steps: only last partial batches are padding
      _, ref_metrics = ref(want[-2], data)
      np.testing.assert_allclose(metrics["padding_efficiency"],
                                 ref_metrics["padding_efficiency"], rtol=1e-6)
  if jax.tree.leaves(state0.server):
    assert moved(got.server, state0.server)
  if jax.tree.leaves(state0.clients):
    assert moved(got.clients, state0.clients)


def test_step_form_client_update_equals_local_train():
  """client_update_from_local(local) is the algorithm's client_update (same arithmetic)."""
  exp = build_experiment(experiment_config("fedprox"))
  alg, data = exp.algorithm, exp.data.train
  state = init_state(alg, exp.sampler, NUM_CLIENTS, seed=0, mesh=exp.mesh)
  from fedjax_sim.protocol import ClientInfo
  info = ClientInfo(jax.numpy.int32(3), jax.numpy.int32(0), jax.numpy.bool_(True))
  cdata = jax.tree.map(lambda a: a[3], data)
  args = (state.server, (), cdata, jax.random.PRNGKey(1), info)
  a = jax.jit(alg.client_update)(*args)
  b = jax.jit(client_update_from_local(alg.local))(*args)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


STREAMED = ("fedavg", "fedprox", "local", "fedavg_pools", "scaffold", "qffl")


def test_every_registered_algorithm_streams_or_says_why():
  """Over the whole registry: the algorithms with a step-form client update are exactly those
  tested above (so a newly registered step-form algorithm must be added there), and every
  other one raises the one-line ValueError naming its reason."""
  from fedjax_sim.algorithms import ALGORITHMS
  from fedjax_sim import stream
  streamable = []
  for name in ALGORITHMS:
    alg = build_experiment(experiment_config(name)).algorithm
    if stream.supported(alg) is None:
      streamable.append(name)
  # fedadam / fedyogi / fedadagrad: the fedavg constructor with another server optimizer.
  assert set(streamable) == set(STREAMED) | {"fedadam", "fedyogi", "fedadagrad"}, streamable


@pytest.mark.parametrize("name", ["corefed", "fedmdfg", "fedre"])
def test_unsupported_algorithms_raise(name):
  exp = build_experiment(experiment_config(name))
  with pytest.raises(ValueError, match="schedule='stream'.*fedavg.*schedule='chunked'"):
    make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, schedule="stream", slots=2)


def test_unknown_schedule_and_bad_slots_raise():
  exp = build_experiment(experiment_config("fedavg"))
  with pytest.raises(ValueError, match="schedule='lanes'"):
    make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, schedule="lanes")
  with pytest.raises(ValueError, match="slots=0"):
    make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, schedule="stream", slots=0)


def test_running_mean_equals_stacked_uploads():
  """FedAvg's server reads only the weighted mean, so the stream folds uploads into a running
  sum; an unmarked wrapper of the same server_update gets the stacked [K] uploads. Same result
  to float32 rounding; the mark is dropped by _replace(server_update=...)."""
  from fedjax_sim.protocol import is_mean_reader
  exp = build_experiment(experiment_config("fedavg"))
  alg, sampler, data = exp.algorithm, exp.sampler, exp.data.train
  assert is_mean_reader(alg.server_update)
  stacked = alg._replace(server_update=lambda *a: alg.server_update(*a))
  assert not is_mean_reader(stacked.server_update)
  out = []
  for a in (alg, stacked):
    state = init_state(a, sampler, NUM_CLIENTS, seed=0, mesh=exp.mesh)
    fn = make_round(a, sampler, seed=0, mesh=exp.mesh, schedule="stream", slots=2,
                    donate=False)
    for _ in range(ROUNDS):
      state, metrics = fn(state, data)
    out.append((state, metrics))
  assert_close(out[0][0].server, out[1][0].server, "fedavg", "running mean vs stacked: ")
  np.testing.assert_allclose(out[0][1]["loss"], out[1][1]["loss"], rtol=1e-6)


_DEVICES_CODE = r"""
import json, jax, numpy as np
from jax.sharding import Mesh
from test_registry_equivalence import experiment_config, NUM_CLIENTS
from fedjax_sim.round import init_state, make_round, make_mesh, replicate
from fedjax_sim.launch.experiment import build_experiment
out = {}
for name in ("fedavg", "local", "qffl"):  # the running mean; per-client state; prepare
  exp = build_experiment(experiment_config(name))
  res = []
  for d in (1, 8):
    mesh = make_mesh(d)
    state = init_state(exp.algorithm, exp.sampler, NUM_CLIENTS, seed=0, mesh=mesh)
    fn = make_round(exp.algorithm, exp.sampler, seed=0, mesh=mesh, schedule="stream", slots=2)
    data = replicate(jax.device_get(exp.data.train), mesh)
    for _ in range(3):
      state, m = fn(state, data)
    res.append([np.asarray(x).ravel().tolist() for x in jax.tree.leaves((state.server,
                                                                        state.clients))])
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))
             for a, b in zip(*res))
  scale = max(float(np.max(np.abs(np.asarray(a)), initial=0.0)) for a in res[0])
  out[name] = [diff, scale, float(m["padding_efficiency"][0])]
print("RESULT" + json.dumps(out))
"""


def test_stream_one_device_equals_eight_devices():
  """The queue dealt over 8 forced CPU devices (K = 5 padded to 8: three empty entries) equals
  one device to float32 rounding (the running sum is psum-ed in another order)."""
  import json
  import os
  from conftest import run_python
  here = os.path.dirname(os.path.abspath(__file__))
  code = f"import sys; sys.path.insert(0, {here!r})\n" + _DEVICES_CODE
  out = json.loads(run_python(code, devices=8, timeout=600).split("RESULT")[1])
  for name, (diff, scale, eff) in out.items():
    assert scale > 0, name
    assert diff <= 1e-6 + 1e-5 * scale, (name, diff, scale)
    assert 0.0 < eff <= 1.0


def test_streamed_grid_equals_separate_runs(tmp_path):
  """A vectorized sweep under schedule='stream' (the streamed round vmapped over the G = 4
  points of a client_lr x seed grid: each point streams its own queue) equals separate
  streamed runs, metrics row by row."""
  import json
  import os
  from conftest import tiny_config
  from test_sweep import assert_metrics_close
  from fedjax_sim.launch import sweep as sw
  from fedjax_sim.launch.experiment import train_and_evaluate
  cfg = tiny_config(schedule="stream", slots=2)
  points = sw.make_points(cfg, {"client_lr": [0.05, 0.1]}, seeds=[0, 1])
  workdir = str(tmp_path / "grid")
  rows = sw.run_sweep(cfg, points, workdir, log=lambda m: None)
  assert all(r["status"] == "ok" and r["mode"] == "vectorized[4]" for r in rows), rows
  hist = lambda d: [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
  for p in (points[1], points[2]):
    sep = str(tmp_path / p.name)
    train_and_evaluate(sw.apply_overrides(cfg, p.overrides), sep)
    h_vec, h_sep = hist(os.path.join(workdir, p.name)), hist(sep)
    assert len(h_vec) == len(h_sep) >= 3  # rounds 0, 2, 4 (eval_every = 2)
    for a, b in zip(h_vec, h_sep):
      assert_metrics_close(a, b, f"{p.name} round {a['round']}")
