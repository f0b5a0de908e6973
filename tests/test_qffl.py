"""q-FFL / q-FedAvg: the server step against a NumPy transcription of Algorithm 2
(docs/decisions.md#q-ffl),
padding slots inert, and q = 0 equal to the uniform average of the local models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.protocol import ClientInfo, ServerInfo
from fedjax_sim.algorithms.qffl import qffl, qffl_step


def _numpy_step(w, g, F, lr, q):
  F = F + 1e-10
  L = 1.0 / lr
  delta = (F ** q)[:, None] * g
  h = q * F ** (q - 1) * np.sum(g ** 2, 1) + L * F ** q
  return w - delta.sum(0) / h.sum()


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 5.0])
def test_server_step_matches_numpy(q):
  rng = np.random.default_rng(0)
  w = rng.normal(size=7)
  g = rng.normal(size=(4, 7))
  F = rng.uniform(0.1, 2.5, size=4)
  lr = np.full(4, 0.05)
  valid = np.array([True, True, True, False])
  got = jax.jit(qffl_step, static_argnums=5)(
      {"a": jnp.asarray(w[:3], jnp.float32), "b": jnp.asarray(w[3:], jnp.float32)},
      {"a": jnp.asarray(g[:, :3], jnp.float32), "b": jnp.asarray(g[:, 3:], jnp.float32)},
      jnp.asarray(F, jnp.float32), jnp.asarray(lr, jnp.float32), jnp.asarray(valid), q)
  want = _numpy_step(w, g[:3], F[:3], 0.05, q)  # the padding slot is dropped
  np.testing.assert_allclose(np.concatenate([got["a"], got["b"]]), want, rtol=2e-5, atol=1e-6)


def test_q_zero_is_uniform_average_of_local_models():
  """One q-FedAvg round with q = 0 lands on the mean of the clients' local models."""
  rng = np.random.default_rng(1)
  C, N, B = 3, 6, 3
  x = jnp.asarray(rng.normal(size=(C, N, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(C, N)), jnp.int32)
  n = jnp.array([6, 3, 5], jnp.int32)
  mask = jnp.arange(N)[None, :] < n[:, None]
  from fedjax_sim.client_data import ClientData
  data = ClientData(x, y, mask, n)
  apply_fn = lambda p, xb: xb @ p["w"] + p["b"]
  init = lambda r: {"w": jax.random.normal(r, (4, 3)) * 0.3, "b": jnp.zeros(3)}
  alg = qffl(apply_fn, init, q=0.0, client_lr=0.2, batch_size=B)
  w = alg.init(jax.random.PRNGKey(0))
  ids = jnp.array([0, 1, 2, 2])
  valid = jnp.array([True, True, True, False])

  @jax.jit
  def run(w):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(ids)
    infos = ClientInfo(ids, jnp.zeros(4, jnp.int32), valid)
    cdata = jax.tree.map(lambda a: a[ids], data)
    cdata = cdata._replace(mask=cdata.mask & valid[:, None],
                           num_examples=jnp.where(valid, cdata.num_examples, 0))
    up, _, m = jax.vmap(alg.client_update, in_axes=(None, None, 0, 0, 0))(w, (), cdata, keys,
                                                                          infos)
    new, _ = alg.server_update(w, up, jnp.ones(4), ServerInfo(jnp.int32(0), ids, n[ids], valid),
                               None)
    local = jax.tree.map(lambda a, g: a[None] - 0.2 * g, w, up["g"])  # w_k = w - lr g_k
    return new, jax.tree.map(lambda a: a[:3].mean(0), local), up["loss"]

  new, mean_local, F = run(w)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new,
               mean_local)
  # F_k is the cross-entropy of the global model on the client's real rows.
  logits = np.asarray(apply_fn(w, x[0]))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  np.testing.assert_allclose(float(F[0]), -np.mean(np.log(p[np.arange(N), np.asarray(y[0])])),
                             rtol=1e-5)


def test_negative_q_rejected():
  with pytest.raises(ValueError, match="q"):
    qffl(lambda p, x: x, lambda r: {}, q=-1.0, client_lr=0.1, batch_size=1)
