"""The round engine: vectorized == per-client loop, chunking, padding, compile contract."""
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import local_train, masked_cross_entropy
from fedjax_sim.protocol import ClientInfo
from fedjax_sim.client_data import pack
from fedjax_sim.reference import make_reference_round
from fedjax_sim.round import init_state, make_mesh, make_round
from fedjax_sim.launch.experiment import build_experiment


def _params_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("algorithm", ["fedavg", "local"])
def test_two_epochs_in_one_vmap_equal_reference_loop(small_config, algorithm):
  """E = 2 with the whole cohort in one vmap (no chunks) == the per-client loop.

  Every registered algorithm is compared with the loop over 3 rounds in
  tests/test_registry_equivalence.py (E = 1, chunks of 2); this adds a second
  epoch (its own shuffle) and the unchunked layout, in the sampler's order.
  """
  small_config.algorithm = algorithm
  small_config.local_epochs = 2
  exp = build_experiment(small_config)
  state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, seed=0)
  round_fn = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, chunk_size=None,
                        donate=False)
  new_state, metrics = round_fn(state, exp.data.train)
  ref_state, _ = make_reference_round(exp.algorithm, exp.sampler, seed=0)(state, exp.data.train)
  _params_close(new_state.server, ref_state.server)
  _params_close(new_state.clients, ref_state.clients)
  assert int(new_state.round) == 1
  assert np.isfinite(metrics["loss"]).all()


def test_fused_rounds_equal_one_at_a_time(small_config):
  exp = build_experiment(small_config)
  state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, seed=0)
  one = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, donate=False)
  three = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, rounds_per_call=3,
                     donate=False)
  s1 = state
  losses = []
  for _ in range(3):
    s1, m = one(s1, exp.data.train)
    losses.append(float(m["loss"][0]))
  s3, m3 = three(state, exp.data.train)
  _params_close(s1.server, s3.server)
  np.testing.assert_allclose(losses, np.asarray(m3["loss"]), rtol=1e-5)
  assert int(s3.round) == 3


def test_round_compiles_once(small_config):
  exp = build_experiment(small_config)
  traces = []
  alg = exp.algorithm
  counting = alg._replace(client_update=lambda *a: (traces.append(1), alg.client_update(*a))[1])
  state = init_state(counting, exp.sampler, exp.data.num_clients, seed=0, mesh=exp.mesh)
  round_fn = make_round(counting, exp.sampler, seed=0, mesh=exp.mesh)
  for _ in range(4):
    state, _ = round_fn(state, exp.data.train)
  assert round_fn._cache_size() == 1
  assert len(traces) == 1
  # State shapes and dtypes are stable across rounds.
  state2, _ = round_fn(state, exp.data.train)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state2) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state)


def test_cohort_depends_only_on_seed_and_round(small_config):
  exp = build_experiment(small_config)
  key = lambda r: jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), r), 3)[0]
  a = exp.sampler.sample(key(5), 5, ())[0]
  b = exp.sampler.sample(key(5), 5, ())[0]
  c = exp.sampler.sample(key(6), 6, ())[0]
  np.testing.assert_array_equal(a, b)
  assert len(set(np.asarray(a).tolist())) == small_config.clients_per_round
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def _linear_problem(n=7):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 3)).astype(np.float32)
  y = rng.integers(0, 2, n).astype(np.int32)
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  loss = lambda p, xb, yb, m, r: masked_cross_entropy(xb @ p["w"] + p["b"], yb, m)
  return x, y, params, loss


def test_local_train_padding_is_inert():
  """A client padded to a longer N trains exactly as the unpadded client."""
  import optax
  x, y, params, loss = _linear_problem()
  one = lambda d: jax.tree.map(lambda a: jnp.asarray(a[0]), d)
  short = one(pack([x], [y], multiple=4))  # N = 8
  long = one(pack([x], [y], multiple=20))  # N = 20
  key = jax.random.PRNGKey(1)
  r1 = local_train(loss, params, optax.sgd(0.5), short, key, epochs=2, batch_size=4)
  r2 = local_train(loss, params, optax.sgd(0.5), long, key, epochs=2, batch_size=4)
  assert float(r1.metrics["steps"]) == 4 == float(r2.metrics["steps"])
  assert float(r1.metrics["useful_examples"]) == 14 == float(r2.metrics["useful_examples"])
  _params_close(r1.params, r2.params, atol=1e-7)


def test_local_train_epochs_visit_each_example_once():
  """One epoch with B = 1 and a loss that counts visits touches every real row once."""
  import optax
  x, y, _, _ = _linear_problem(5)
  d = jax.tree.map(lambda a: jnp.asarray(a[0]), pack([x], [y], multiple=8))
  counts = {"c": jnp.zeros(8)}
  # d loss / d c[i] = -1 for the visited row, so SGD(lr=1) adds 1 per visit.
  loss = lambda p, xb, yb, m, r: -jnp.sum(p["c"] * 0) - jnp.sum(
      jnp.where(m, 1.0, 0.0) * p["c"][jnp.argmax(jnp.all(d.x == xb[0], axis=1))])
  res = local_train(loss, counts, optax.sgd(1.0), d, jax.random.PRNGKey(0), epochs=2,
                    batch_size=1)
  np.testing.assert_array_equal(np.asarray(res.params["c"]), [2, 2, 2, 2, 2, 0, 0, 0])


def test_zero_example_client_is_a_no_op():
  x = np.ones((4, 3), np.float32)
  y = np.zeros(4, np.int32)
  d = jax.tree.map(lambda a: jnp.asarray(a[0]), pack([x], [y], multiple=2))._replace(
      num_examples=jnp.int32(0), mask=jnp.zeros(4, bool))
  params = {"w": jnp.ones((3, 2))}
  import optax
  loss = lambda p, xb, yb, m, r: masked_cross_entropy(xb @ p["w"], yb, m)
  res = local_train(loss, params, optax.sgd(1.0), d, jax.random.PRNGKey(0), epochs=3,
                    batch_size=2)
  np.testing.assert_array_equal(res.params["w"], params["w"])
  assert float(res.metrics["steps"]) == 0


def test_fixed_local_steps(small_config):
  small_config.local_steps = 3
  exp = build_experiment(small_config)
  state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, seed=0)
  round_fn = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, donate=False)
  new_state, m = round_fn(state, exp.data.train)
  ref_state, _ = make_reference_round(exp.algorithm, exp.sampler, seed=0)(state, exp.data.train)
  _params_close(new_state.server, ref_state.server)
  # Every client takes exactly 3 steps of B=10 slots.
  assert float(m["useful_examples"][0]) <= 3 * 10 * small_config.clients_per_round


def test_fedprox_with_mu_zero_is_fedavg(small_config):
  small_config.algorithm = "fedavg"
  a = build_experiment(small_config)
  small_config.algorithm = "fedprox"
  small_config.fedprox = ml_collections.ConfigDict({"mu": 0.0})
  b = build_experiment(small_config)
  outs = []
  for exp in (a, b):
    state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, seed=0)
    outs.append(make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh)(
        state, exp.data.train)[0].server.params)
  _params_close(outs[0], outs[1], atol=1e-7)


def test_fedprox_pulls_toward_global(small_config):
  """A large mu keeps the local model closer to the global model."""
  from fedjax_sim.algorithms.fedprox import proximal_term
  dists = []
  for mu in (0.0, 10.0):
    small_config.algorithm = "fedprox"
    small_config.fedprox = ml_collections.ConfigDict({"mu": mu})
    exp = build_experiment(small_config)
    state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, seed=0)
    d = jax.tree.map(lambda a: a[0], exp.data.train)
    up, _, _ = exp.algorithm.client_update(
        state.server, (), d, jax.random.PRNGKey(0),
        ClientInfo(jnp.int32(0), jnp.int32(0), jnp.bool_(True)))
    dists.append(float(proximal_term(up, jax.tree.map(jnp.zeros_like, up))))
  assert dists[1] < dists[0]


def test_mesh_axis_and_padding_layout():
  from fedjax_sim.round import _slot_order, cohort_layout
  lay = cohort_layout(20, 8, 2)
  assert lay.padded % 16 == 0 and lay.padded >= 20
  order = _slot_order(lay)
  assert sorted(order.tolist()) == list(range(lay.padded))
  assert make_mesh().axis_names == ("clients",)
