"""Flat client storage (fedjax_sim/client_data.py) equals padded storage.

* ``pack_flat`` / ``flatten`` / ``unflatten`` round-trip the padded ``pack``;
* a round reads the same batches from either storage, so runs are BIT-identical: the chunked
  schedule (with client state), the streaming schedule and the per-client reference loop, 2
  rounds each on the registry test's tiny experiment (model pools read clients through the same
  gather_clients);
* flat storage's bytes follow the examples: with one large client among many small ones it
  stores a small fraction of the padded C x N_max rows;
* sharded data (``make_round(shard_data=True)``, C split over 8 forced devices) equals
  replicated data on one device.

Axis legend: C clients, N examples per client, T total examples.
"""
import jax
import numpy as np
import pytest

from test_registry_equivalence import CHUNK, NUM_CLIENTS, experiment_config
from fedjax_sim.client_data import (ClientData, FlatClientData, flatten, gather_clients, pack,
                                    pack_flat, stored_bytes, to_device, unflatten)
from fedjax_sim.reference import make_reference_round
from fedjax_sim.round import init_state, make_round
from fedjax_sim.launch.experiment import build_experiment


def _clients(sizes, dim=3, seed=0):
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, dim)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 5, n).astype(np.int32) for n in sizes]
  return xs, ys


def test_pack_flat_round_trips_padded_pack():
  xs, ys = _clients([3, 0, 7, 1, 12])
  padded = pack(xs, ys, multiple=4)
  flat = pack_flat(xs, ys, multiple=4)
  assert isinstance(flat, FlatClientData) and flat.max_examples == padded.max_examples == 12
  np.testing.assert_array_equal(flat.num_examples, padded.num_examples)
  np.testing.assert_array_equal(flat.offsets, [0, 3, 3, 10, 11])
  assert flat.total_examples == 23 and flat.x.shape == (23 + 12, 3)
  for a, b in zip(jax.tree.leaves(unflatten(flat)), jax.tree.leaves(padded)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(flatten(padded)), jax.tree.leaves(flat)):
    np.testing.assert_array_equal(a, b)
  one = gather_clients(to_device(flat), np.int32(2))  # one client's [N, ...] view
  np.testing.assert_array_equal(one.x[:7], xs[2])
  assert not np.asarray(one.x[7:]).any() and int(one.num_examples) == 7


def test_flat_storage_holds_token_sequences():
  """Next-character data: x, y int32 [N, T] per client; the flat views equal the padded ones
  (ids stay integers, padded rows are zeros)."""
  rng = np.random.default_rng(1)
  sizes = [2, 5, 1]
  xs = [rng.integers(0, 90, (n, 7)).astype(np.int32) for n in sizes]
  ys = [rng.integers(-1, 90, (n, 7)).astype(np.int32) for n in sizes]
  n = 6
  padded = ClientData(*(np.stack([np.concatenate([a, np.zeros((n - len(a), 7), np.int32)])
                                  for a in arrs]) for arrs in (xs, ys)),
                      np.arange(n)[None] < np.array(sizes)[:, None], np.array(sizes, np.int32))
  assert padded.max_examples == n
  flat = flatten(padded)
  assert flat.x.dtype == np.int32 and flat.y.shape == (sum(sizes) + n, 7)
  for a, b in zip(jax.tree.leaves(unflatten(flat)), jax.tree.leaves(padded)):
    np.testing.assert_array_equal(a, b)


def test_flat_bytes_follow_the_examples():
  sizes = [5] * 199 + [500]  # one large client: padded storage is 200 x 500 rows
  flat, padded = pack_flat(*_clients(sizes)), pack(*_clients(sizes))
  rows = sum(sizes)
  assert stored_bytes(padded) > 20 * stored_bytes(flat)
  # x rows (3 floats) + y (int32) per stored row, plus the N-row tail and per-client ints.
  assert stored_bytes(flat) <= (rows + 500) * 16 + 200 * 8


def _runs(alg, sampler, data, mesh, **kw):
  state = init_state(alg, sampler, NUM_CLIENTS, seed=0, mesh=mesh)
  if kw.pop("reference", False):
    fn = make_reference_round(alg, sampler, seed=0, sort_by_size=True)
  else:
    fn = make_round(alg, sampler, seed=0, mesh=mesh, donate=False, **kw)
  out = []
  for _ in range(2):
    state, metrics = fn(state, data)
    out.append((state, metrics))
  return out


@pytest.mark.parametrize("name,kw", [
    ("fedavg", dict(schedule="stream", slots=2)),
    ("fedavg", dict(reference=True)),
    ("scaffold", dict(chunk_size=CHUNK)),  # client state, chunked
])
def test_flat_storage_equals_padded_storage(name, kw):
  exp = build_experiment(experiment_config(name))
  padded = exp.data.train
  flat = to_device(flatten(jax.device_get(padded)))
  assert isinstance(padded, ClientData) and isinstance(flat, FlatClientData)
  got = _runs(exp.algorithm, exp.sampler, flat, exp.mesh, **dict(kw))
  want = _runs(exp.algorithm, exp.sampler, padded, exp.mesh, **dict(kw))
  for (gs, gm), (ws, wm) in zip(got, want):
    for a, b in zip(jax.tree.leaves((gs, gm)), jax.tree.leaves((ws, wm))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_SHARDED_CODE = r"""
import json, jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from test_registry_equivalence import experiment_config, NUM_CLIENTS
from fedjax_sim.client_data import pad_clients
from fedjax_sim.round import init_state, make_round, make_mesh, replicate
from fedjax_sim.launch.experiment import build_experiment
out = {}
for name in ("fedavg", "scaffold"):
  exp = build_experiment(experiment_config(name))
  host = jax.device_get(exp.data.train)
  res = []
  for d, shard in ((1, False), (8, True)):
    mesh = make_mesh(d)
    state = init_state(exp.algorithm, exp.sampler, NUM_CLIENTS, seed=0, mesh=mesh)
    fn = make_round(exp.algorithm, exp.sampler, seed=0, mesh=mesh, chunk_size=1,
                    shard_data=shard)
    if shard:
      data = jax.device_put(pad_clients(host, d), NamedSharding(mesh, P("clients")))
      per_device = {s.data.shape for s in data.x.addressable_shards}
      assert per_device == {(data.x.shape[0] // d,) + data.x.shape[1:]}, per_device
    else:
      data = replicate(host, mesh)
    for _ in range(3):
      state, m = fn(state, data)
    res.append([np.asarray(x).ravel() for x in jax.tree.leaves((state.server, state.clients))])
  out[name] = [max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(*res)),
               max(float(np.max(np.abs(a), initial=0.0)) for a in res[0])]
print("RESULT" + json.dumps(out))
"""


def test_sharded_data_on_eight_devices_equals_replicated_on_one():
  """make_round(shard_data=True): the client data split along C over 8 forced devices (12
  clients padded to 16 with empty ones; each device holds 2) gives the rounds of replicated
  data on one device, to float32 rounding (fedavg; scaffold with client state)."""
  import json
  import os
  from conftest import run_python
  here = os.path.dirname(os.path.abspath(__file__))
  code = f"import sys; sys.path.insert(0, {here!r})\n" + _SHARDED_CODE
  out = json.loads(run_python(code, devices=8, timeout=600).split("RESULT")[1])
  for name, (diff, scale) in out.items():
    assert scale > 0, name
    assert diff <= 1e-6 + 1e-5 * scale, (name, diff, scale)


@pytest.mark.parametrize("name", ["fedavg", "local", "fedavg_pools"])
def test_flat_test_split_evaluates_as_padded(name):
  """Evaluation reads each client's test rows from either storage: the per-client counts and
  the global metrics are bit-identical (global model; per-client models; model pools)."""
  from fedjax_sim.evaluation import make_evaluate
  exp = build_experiment(experiment_config(name))
  state = init_state(exp.algorithm, exp.sampler, NUM_CLIENTS, seed=0, mesh=exp.mesh)
  d = exp.data
  padded = jax.device_get(d.test)
  flat = to_device(flatten(padded))
  assert isinstance(flat, FlatClientData) and stored_bytes(flat) < stored_bytes(padded)
  evaluate = make_evaluate(exp.algorithm)
  got = evaluate(state.server, state.clients, flat, d.test_x, d.test_y)
  want = evaluate(state.server, state.clients, to_device(padded), d.test_x, d.test_y)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  assert float(np.sum(want["client_count"])) == float(np.sum(padded.mask))
