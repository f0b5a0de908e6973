"""SCAFFOLD against a NumPy computation of Algorithm 1 (option II) on a linear model."""
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.protocol import ClientInfo, ServerInfo
from fedjax_sim.algorithms.scaffold import ServerState, scaffold
from fedjax_sim.client_data import pack


def _softmax_grad(w, x, y):
  logits = x @ w
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1
  return x.T @ p / len(y)


def test_scaffold_client_and_server_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  y = rng.integers(0, 2, 6).astype(np.int32)
  apply_fn = lambda p, xb: xb @ p["w"]
  init = lambda r: {"w": jnp.zeros((3, 2))}
  lr, n_clients = 0.3, 4
  alg = scaffold(apply_fn, init, client_lr=lr, batch_size=6, num_clients=n_clients, epochs=3)
  w0 = rng.normal(size=(3, 2)).astype(np.float32)
  c = rng.normal(size=(3, 2)).astype(np.float32) * 0.1
  ci = rng.normal(size=(3, 2)).astype(np.float32) * 0.1
  server = ServerState({"w": jnp.asarray(w0)}, {"w": jnp.asarray(c)})
  data = jax.tree.map(lambda a: jnp.asarray(a[0]), pack([x], [y], multiple=6))
  (dy, dc), ci_new, m = alg.client_update(server, {"w": jnp.asarray(ci)}, data,
                                          jax.random.PRNGKey(0),
                                          ClientInfo(jnp.int32(0), jnp.int32(0), jnp.bool_(True)))
  # NumPy: full-batch steps (B = n), so the shuffle does not matter.
  w = w0.copy()
  for _ in range(3):
    w = w - lr * (_softmax_grad(w, x, y) - ci + c)
  ci_ref = ci - c + (w0 - w) / (3 * lr)
  np.testing.assert_allclose(dy["w"], w - w0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ci_new["w"], ci_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dc["w"], ci_ref - ci, rtol=1e-4, atol=1e-5)

  # Server: x + mean dy; c + |S|/N mean dc (two identical uploads, one padding slot).
  stack = lambda t: jax.tree.map(lambda a: jnp.stack([a, a, 0 * a]), t)
  info = ServerInfo(jnp.int32(0), jnp.arange(3), jnp.array([6, 6, 0]),
                    jnp.array([True, True, False]))
  new, _ = alg.server_update(server, (stack(dy), stack(dc)), jnp.array([6.0, 6.0, 0.0]), info,
                             jax.random.PRNGKey(0))
  np.testing.assert_allclose(new.params["w"], w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new.control["w"], c + 2 / n_clients * (ci_ref - ci), rtol=1e-4,
                             atol=1e-5)


def test_scaffold_runs_in_the_vectorized_round(small_config):
  from fedjax_sim.round import init_state, make_round
  from fedjax_sim.launch.experiment import build_experiment
  small_config.algorithm = "scaffold"
  exp = build_experiment(small_config)
  state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, 0, exp.mesh)
  state, m = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, rounds_per_call=3)(
      state, exp.data.train)
  assert np.isfinite(np.asarray(m["loss"])).all()
  # Control variates of participating clients moved; the others stayed at zero.
  norms = np.abs(np.asarray(state.clients["Dense_0"]["kernel"])).sum(axis=(1, 2))
  assert (norms > 0).sum() >= small_config.clients_per_round
  assert (norms == 0).any()
