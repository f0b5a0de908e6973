"""Model pools: a heterogeneous round with 3 pools equals running each pool separately."""
import jax
import numpy as np

from fedjax_sim.algorithms.pooled import DataSpec, assign_round_robin, fedavg_per_pool
from fedjax_sim.data import build_federated_data
from fedjax_sim.evaluation import make_evaluate, summarize
from fedjax_sim.round import SimState, init_state, make_mesh, make_round

ARCHS = ("mlp_s", "mlp_m", "cnn_s")


def _setup(small_config):
  data = build_federated_data(small_config.data, batch_size=10, seed=0)
  spec = DataSpec(data.input_shape, data.num_classes, data.num_clients)
  return data, spec


def test_round_robin_assignment_covers_every_client_once():
  ids = assign_round_robin(10, 3)
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(10))
  np.testing.assert_array_equal(ids[1], [1, 4, 7])


def test_three_pool_round_equals_each_pool_alone(small_config):
  data, spec = _setup(small_config)
  kw = dict(client_lr=0.1, batch_size=10, epochs=1)
  mesh = make_mesh()
  ids = assign_round_robin(spec.num_clients, 3)
  alg3 = fedavg_per_pool(ARCHS, spec, clients_per_round=6, **kw)
  assert [p.clients_per_round for p in alg3.pools] == [2, 2, 2]
  state3 = init_state(alg3, None, spec.num_clients, seed=0, mesh=mesh)
  out3, m3 = make_round(alg3, seed=0, mesh=mesh, chunk_size=1, rounds_per_call=2,
                        donate=False)(state3, data.train)
  for p, arch in enumerate(ARCHS):
    alg1 = fedavg_per_pool([arch], spec, clients_per_round=2, client_ids=[ids[p]], **kw)
    state1 = SimState(state3.round, (state3.server[p],), (state3.clients[p],), ((),))
    out1, m1 = make_round(alg1, seed=0, mesh=mesh, rounds_per_call=2, donate=False)(
        state1, data.train)
    for a, b in zip(jax.tree.leaves(out3.server[p]), jax.tree.leaves(out1.server[0])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m3[f"{arch}/loss"], m1["loss"], rtol=1e-5)
  # The pooled round evaluates every pool with its own model.
  raw = make_evaluate(alg3)(out3.server, out3.clients, data.test, data.test_x, data.test_y)
  summary = summarize(raw, len(data.test_y))
  assert all(f"{a}/test_accuracy" in summary for a in ARCHS)
  # Each pool's global model is also scored on the global test set, and it agrees with a
  # direct computation.
  for p, arch in enumerate(ARCHS):
    logits = alg3.pools[p].apply_fn(out3.server[p].params, data.test_x)
    direct = float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(data.test_y)))
    assert abs(summary[f"{arch}/global_test_accuracy"] - direct) < 1e-6
  assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_pool_cohort_sizes_sum_to_k():
  from fedjax_sim.algorithms.pooled import pool_cohort_sizes
  import pytest
  for sizes, k in [([3, 3], 3), ([34, 33, 33], 20), ([5, 5, 5], 6), ([50, 15], 20),
                   ([1, 1, 98], 5), ([10], 10)]:
    ks = pool_cohort_sizes(sizes, k)
    assert sum(ks) == k and all(1 <= a <= n for a, n in zip(ks, sizes)), (sizes, k, ks)
  with pytest.raises(ValueError, match="clients_per_round"):
    pool_cohort_sizes([3, 3, 3], 2)
