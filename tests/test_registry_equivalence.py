"""Every registered algorithm: the vectorized round equals the per-client loop, and 1 device
equals 8.

Parametrized over every name in the registry ``ALGORITHMS``, read from the
registries at collection time, so an algorithm added to a registry is covered with no new test.
Each runs a tiny experiment (:func:`experiment_config`: 12 digits clients, K = 5, MLP(16) or
the small MODEL_ZOO pair mlp_s / mlp_m, B = 10, E = 1, 3 rounds):

* ``test_round_equals_reference_loop``: ``make_round`` on one device with ``chunk_size=2``
  (K = 5 is 3 chunks with one zero-weight padding slot; pooled K = 3 + 2, pool 0 padded to 4)
  against :func:`fedjax_sim.reference.make_reference_round` (no vmap, no padding, no chunks,
  no shard_map), fed the round builder's size-sorted cohort order; server state AND per-client
  state compared after every round.
  It also checks that round 0 in the sampler's order equals round 0 in size order (the
  server update does not depend on the order of its uploads).
* ``test_one_device_equals_eight_devices``: ``make_round`` on a 1-device mesh
  (``chunk_size=2``) against an 8-device mesh (one chunk per device, the cohort padded to 8
  slots per pool), 3 rounds, in subprocesses with 8 forced CPU devices (the flag must be set
  before jax is imported); the registry is split into a few groups, each run once per session
  (a file lock shares the result between pytest-xdist workers) and read per algorithm.

Tolerance: rtol 1e-5, atol 1e-6. Both sides run the same float32 operations; what differs is
how XLA compiles them (a vmapped client's matmuls are batched, the server sums over a padded
cohort), a few ulp (~1e-7 relative) per operation, which local SGD then carries through 3
rounds. Measured: most algorithms agree bit for bit with the reference and the rest
within 2.4e-7 (absolute, FedMDFG); 8 devices vs 1 within 2.4e-7 too. Per-algorithm
exceptions are in :data:`TOLERANCE`, each with its reason.

The 8-device layout puts one chunk on each device, which keeps the single device's slot
order (size order); that FedMDFG's slot-ordered state matches relies on it. A client's key
depending on its slot instead of its id is therefore caught by the reference comparison,
not by the device comparison.

Axis legend: C clients, K cohort.
"""
import fcntl
import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import run_python, tiny_config
from fedjax_sim.algorithms import ALGORITHMS, knob_defaults
from fedjax_sim.reference import make_reference_round
from fedjax_sim.round import cohort_layout, init_state, make_round
from fedjax_sim.launch.experiment import build_experiment

NAMES = list(ALGORITHMS)
ROUNDS = 3
NUM_CLIENTS, COHORT, CHUNK = 12, 5, 2
RTOL, ATOL = 1e-5, 1e-6
# name -> (rtol, atol) where float32 rounding is amplified beyond the default (see each reason).
TOLERANCE: dict[str, tuple[float, float]] = {
    # The alignment loss is NT-Xent at tau_c = 0.07: a rounding error in an embedding moves its
    # gradient ~1/tau_c^2 = 200x more than cross-entropy's. One client update of the same
    # client and key, vmapped vs alone, differs by 5e-7 (7e-8 at tau_c = 0.5 or without the
    # term); over 3 rounds the stored updates (differences w_t - w_i) differ by up to 3e-6.
    "corefed": (1e-5, 1e-5),
    "refed": (1e-5, 1e-5),
}
# name -> server-state fields kept in cohort-slot order (a permutation when the order changes);
# compared after sorting by client id instead of field by field.
SLOT_ORDERED_STATE = {"fedmdfg": ("last_ids", "last_live", "last_grads")}
GROUP_SIZE = 6  # algorithms per 8-device subprocess


def experiment_config(name: str) -> ml_collections.ConfigDict:
  """A seconds-long config for registry algorithm ``name`` (12 clients, K = 5, 3 rounds)."""
  c = tiny_config(algorithm=name, rounds=ROUNDS, clients_per_round=COHORT, chunk_size=CHUNK,
                  rounds_per_call=1, local_epochs=1, batch_size=10)
  c.data.num_clients = NUM_CLIENTS
  c.model_kwargs.hidden = (16,)
  if name in ("fedadam", "fedyogi", "fedadagrad"):
    c.server_lr = 0.01  # an adaptive server step of 1.0 per coordinate overshoots
  # Model pools: two small architectures (round-robin, 6 clients each, K split 3 + 2).
  c.archs = ("mlp_s", "mlp_m")
  # FedRE and its baselines: server head batches of 4, so the server takes several SGD steps
  # (their order is part of what is compared).
  knobs = knob_defaults(name)
  if "rm" in knobs:  # the split-model methods: D = 8
    c[name] = ml_collections.ConfigDict({"dim": 8})
    if "server_batch_size" in knobs:
      c[name].server_batch_size = 4
  if name in ("fedalignuniform", "fedsimclr", "ssd"):
    # SSD's disjoint DSR blocks need D >= C.
    c[name] = ml_collections.ConfigDict(dict(encoder_kind="mlp", encoder_hidden=(16,), dim=16,
                                             projector_hidden=16))
    # At client lr 0.1 this tiny SSL training is chaotic: a 1e-7 relative perturbation of the
    # initial model grows to 1e-4 after one round and 8e-2 after two (FedAlignUniform), so
    # float32 rounding alone (8 devices vs 1) would diverge. At 0.02 it stays below 1e-6.
    c.client_lr = 0.02
  if name == "codist":  # pools c.archs = (small, large); the data hold out the server set
    c.codist = ml_collections.ConfigDict(dict(
        mode="merged", large_fraction=0.5, k_large=3, alpha=0.3, period=2, distill_steps=2,
        distill_lr=1e-3, temperature=2.0, distill_batch=16))
    c.data.server_size, c.data.server_seed = 40, 0
  if name in ("fedmuscle", "fedhenn", "cofed_cotrain"):  # multi-task users and a public set
    c.archs = ("mlp_s", "mlp_m", "mlp_l", "cnn_s", "cnn_m")  # pools of 3, 3, 2, 2, 2: padding
    c.data.dataset = "digits_multitask"
    c.data.examples_per_user, c.data.public_per_class = 10, 2
    c[name] = ml_collections.ConfigDict(dict(public_batch=4, proj_dim=4))
    if name == "fedmuscle":
      c.fedmuscle.update(M=2, align_steps=1)
  return c


def cohort_sizes(algorithm) -> list[int]:
  """K per pool (one entry for a single-pool algorithm)."""
  if algorithm.pools:
    return [p.clients_per_round for p in algorithm.pools]
  return [COHORT]


def _canonical(name: str, state):
  """``state`` with the slot-ordered server fields of ``name`` sorted by client id."""
  fields = SLOT_ORDERED_STATE.get(name)
  if not fields:
    return state
  server = state.server
  order = np.argsort(np.asarray(server.last_ids), kind="stable")
  return state._replace(server=server._replace(
      **{f: np.asarray(getattr(server, f))[order] for f in fields}))


def _pairs(got, want):
  """(path string, got leaf, want leaf) over two pytrees of the same structure."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  flat = jax.tree_util.tree_flatten_with_path(got)[0]
  return [(jax.tree_util.keystr(p), np.asarray(g), np.asarray(w))
          for (p, g), w in zip(flat, jax.tree.leaves(want))]


def assert_close(got, want, name: str, what: str):
  """Float leaves to the tolerance of ``name``, other leaves (ids, counts, masks) exactly."""
  rtol, atol = TOLERANCE.get(name, (RTOL, ATOL))
  for path, g, w in _pairs(got, want):
    if np.issubdtype(w.dtype, np.inexact):
      np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{name}: {what}{path}")
    else:
      np.testing.assert_array_equal(g, w, err_msg=f"{name}: {what}{path}")


def excess(got, want, name: str) -> float:
  """max over leaves of |got - want| - (atol + rtol |want|) (0 tolerance for non-float
  leaves): <= 0 iff :func:`assert_close` passes. A plain float, for JSON."""
  rtol, atol = TOLERANCE.get(name, (RTOL, ATOL))
  out = []
  for _, g, w in _pairs(got, want):
    if g.size:
      tol = atol + rtol * np.abs(w.astype(np.float64)) if np.issubdtype(
          w.dtype, np.inexact) else 0.0
      out.append(float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)) - tol)))
  return max(out, default=-1.0)


def max_abs(got, want) -> float:
  return max((float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
              for _, g, w in _pairs(got, want) if g.size), default=0.0)


def moved(after, before) -> bool:
  return any(np.any(g != w) for _, g, w in _pairs(after, before))


@pytest.mark.parametrize("name", NAMES)
def test_round_equals_reference_loop(name):
  exp = build_experiment(experiment_config(name))
  alg, sampler, data = exp.algorithm, exp.sampler, exp.data.train
  # The layout really has padding slots (and more than one chunk) in some pool.
  layouts = [cohort_layout(k, 1, CHUNK) for k in cohort_sizes(alg)]
  assert any(lay.padded > lay.cohort for lay in layouts)
  assert any(lay.padded // lay.chunk > 1 for lay in layouts)
  state0 = init_state(alg, sampler, NUM_CLIENTS, seed=0, mesh=exp.mesh)
  vec = make_round(alg, sampler, seed=0, mesh=exp.mesh, chunk_size=CHUNK, donate=False)
  ref = make_reference_round(alg, sampler, seed=0, sort_by_size=True)
  # Order invariance: round 0 in the sampler's order == in size order (the round builder
  # always sorts, so a server update that depends on the order of its uploads would make the
  # layout matter). Same compiled functions as below.
  sampled, _ = ref(state0, data, sort_by_size=False)
  by_size, _ = ref(state0, data)
  assert_close(_canonical(name, sampled), _canonical(name, by_size), name,
               "round 0, sampler order vs size order: ")
  got = want = state0
  for r in range(ROUNDS):
    got, metrics = vec(got, data)
    want, ref_metrics = ref(want, data)
    assert int(got.round) == int(want.round) == r + 1
    assert_close(got.server, want.server, name, f"round {r} server")
    assert_close(got.clients, want.clients, name, f"round {r} clients")
    assert_close(got.sampler, want.sampler, name, f"round {r} sampler")
    if "useful_examples" in ref_metrics:  # same real examples trained
      np.testing.assert_allclose(metrics["useful_examples"], ref_metrics["useful_examples"])
  # The comparison is not between two untouched states.
  if jax.tree.leaves(state0.server):
    assert moved(got.server, state0.server), f"{name}: the server state never changed"
  if jax.tree.leaves(state0.clients):
    assert moved(got.clients, state0.clients), f"{name}: no client state changed"


GROUPS = [NAMES[i:i + GROUP_SIZE] for i in range(0, len(NAMES), GROUP_SIZE)]

EIGHT_DEVICES = r"""
import json, sys
sys.path.insert(0, {tests!r})
import jax
assert jax.device_count() == 8
import test_registry_equivalence as t
from fedjax_sim.round import init_state, make_mesh, make_round, replicate
from fedjax_sim.launch.experiment import build_experiment
out = {{}}
for name in {names!r}:
  exp = build_experiment(t.experiment_config(name))
  alg, sampler = exp.algorithm, exp.sampler
  runs = []
  for devices, chunk in ((1, t.CHUNK), (8, None)):
    mesh = make_mesh(devices)
    data = replicate(exp.data.train, mesh)
    state = init_state(alg, sampler, t.NUM_CLIENTS, seed=0, mesh=mesh)
    round_fn = make_round(alg, sampler, seed=0, mesh=mesh, chunk_size=chunk, donate=False)
    states = [state]
    for _ in range(t.ROUNDS):
      state, _ = round_fn(state, data)
      states.append(jax.device_get(state))
    runs.append(states)
  one, eight = runs
  out[name] = {{
      "excess": [t.excess(a, b, name) for a, b in zip(eight[1:], one[1:])],
      "max_abs": [t.max_abs(a, b) for a, b in zip(eight[1:], one[1:])],
      "moved": t.moved(one[-1].server, one[0].server) or t.moved(one[-1].clients, one[0].clients),
  }}
print(json.dumps(out))
"""


def _shared_dir(tmp_path_factory) -> str:
  """A directory shared by this session's pytest-xdist workers (and by nothing else)."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path = root / "registry_eight_devices"
  path.mkdir(exist_ok=True)
  return str(path)


def _eight_device_results(group: int, shared: str) -> dict:
  """Group ``group``'s subprocess result, computed by the first worker that asks for it."""
  path = os.path.join(shared, f"group{group}.json")
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(path):
      try:
        text = run_python(EIGHT_DEVICES.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                               names=GROUPS[group]), devices=8, timeout=900)
        result = json.loads(text.strip().splitlines()[-1])
      except Exception as e:  # noqa: BLE001 - reported to every algorithm of the group
        result = {"error": f"{type(e).__name__}: {e}"[-4000:]}
      with open(path, "w") as f:
        json.dump(result, f)
  with open(path) as f:
    return json.load(f)


@pytest.mark.parametrize("name", NAMES)
def test_one_device_equals_eight_devices(name, tmp_path_factory):
  group = next(g for g, names in enumerate(GROUPS) if name in names)
  result = _eight_device_results(group, _shared_dir(tmp_path_factory))
  assert "error" not in result, result.get("error")
  res = result[name]
  assert res["moved"], f"{name}: the state never changed"
  assert len(res["excess"]) == ROUNDS
  # excess <= 0 for every round: every leaf of server and client state is within tolerance.
  assert max(res["excess"]) <= 0, f"{name}: 8 devices vs 1, max |diff| per round {res['max_abs']}"


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
