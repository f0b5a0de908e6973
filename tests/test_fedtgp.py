"""FedTGP (arXiv 2401.03230): the adaptive margin and the ACL loss against NumPy statements,
the server's TGP training step, padding slots, nearest-prototype inference and a short
training run on digits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fedjax_sim.algorithms import fedtgp as tgp
from fedjax_sim.algorithms.fedproto import ProtoUpload
from fedjax_sim.algorithms.pooled import DataSpec
from fedjax_sim.launch.experiment import build_experiment
from fedjax_sim.protocol import ServerInfo
from fedjax_sim.simulation import simulate

L, D = 4, 3
KW = dict(client_lr=0.1, batch_size=4, epochs=1, local_steps=0, client_momentum=0.0,
          lr_decay=1.0)


def numpy_margin(protos, counts, valid, tau):
  """The official server's ``receive_protos`` as loops: plain per-class mean of the client
  prototypes, class-wise minimum distance to another class, absent partners -> the minimum,
  margin = min(max gap, tau)."""
  q = {}
  for c in range(protos.shape[1]):
    rows = [protos[k, c] for k in range(protos.shape[0]) if valid[k] and counts[k, c] > 0]
    if rows:
      q[c] = np.mean(rows, axis=0)
  gap = np.full(protos.shape[1], 1e9)
  for c1 in q:
    for c2 in q:
      if c1 > c2:
        d = np.linalg.norm(q[c1] - q[c2])
        gap[c1], gap[c2] = min(gap[c1], d), min(gap[c2], d)
  gap[gap > 1e8] = gap.min()
  return min(gap.max(), tau)


def numpy_acl(gen, reps, labels, valid, margin):
  """The official server's loss: distances by ||p||^2 - 2 p.P + ||P||^2, logits -(dist +
  margin onehot), cross-entropy averaged over the (valid) pairs."""
  dist = np.sqrt((reps ** 2).sum(1, keepdims=True) - 2 * reps @ gen.T + (gen ** 2).sum(1)[None])
  logits = -(dist + margin * np.eye(gen.shape[0])[labels])
  logp = logits - logits.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  ce = -logp[np.arange(len(labels)), labels]
  return ce[valid].mean()


def _uploads(seed=0, k=5):
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(k, L, D)).astype(np.float32)
  counts = rng.integers(0, 3, size=(k, L)).astype(np.float32)
  counts[:, 3] = 0  # nobody holds class 3
  counts[0, :3] = 1.0
  counts[k - 1] = 9.0  # a padding slot holding every class must not count
  valid = np.arange(k) < k - 1
  return protos, counts, valid


@pytest.mark.parametrize("tau", [100.0, 0.3])
def test_adaptive_margin_equals_numpy(tau):
  protos, counts, valid = _uploads()
  got = tgp.adaptive_margin(jnp.asarray(protos), jnp.asarray(counts), jnp.asarray(valid), tau)
  np.testing.assert_allclose(got, numpy_margin(protos, counts, valid, tau), rtol=1e-5)
  # One class present: no pair, the margin is the threshold.
  one = np.zeros_like(counts)
  one[:, 1] = 2.0
  assert float(tgp.adaptive_margin(jnp.asarray(protos), jnp.asarray(one), jnp.asarray(valid),
                                   tau)) == pytest.approx(numpy_margin(protos, one, valid, tau))


def test_acl_loss_equals_numpy():
  rng = np.random.default_rng(1)
  gen = rng.normal(size=(L, D)).astype(np.float32)
  reps = rng.normal(size=(9, D)).astype(np.float32)
  labels = rng.integers(0, L, 9).astype(np.int32)
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
  for margin in (0.0, 0.7, 5.0):
    got = tgp.acl_loss(jnp.asarray(gen), jnp.asarray(reps), jnp.asarray(labels),
                       jnp.asarray(valid), jnp.float32(margin))
    np.testing.assert_allclose(got, numpy_acl(gen, reps, labels, valid, margin), rtol=1e-5)


def test_generator_and_one_server_step():
  """P^ = W2 relu(W1 e + b1) + b2 in NumPy; one epoch whose single batch holds every pair is
  one SGD step on the mean ACL loss of the valid pairs (invalid rows and the order inert)."""
  params = tgp.init_generator(jax.random.PRNGKey(0), L, D, 5)
  p = jax.tree.map(np.asarray, params)
  want = np.maximum(p["embedding"] @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
  want = want @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(tgp.generate(params), want, rtol=1e-5, atol=1e-6)
  protos, counts, valid = _uploads()
  reps = jnp.asarray(protos.reshape(-1, D))
  labels = jnp.asarray(np.tile(np.arange(L), len(valid)), jnp.int32)
  rvalid = jnp.asarray(((counts > 0) & valid[:, None]).reshape(-1))
  ids = jnp.arange(reps.shape[0], dtype=jnp.int32)
  margin = jnp.float32(0.5)
  train = jax.jit(lambda q: tgp.train_generator(q, reps, labels, rvalid, ids,
                                                jax.random.PRNGKey(1), margin, lr=0.1,
                                                batch_size=64, epochs=1))
  new, loss = train(params)
  f = lambda q: tgp.acl_loss(tgp.generate(q), reps, labels, rvalid, margin)
  g = jax.grad(f)(params)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(jax.tree.map(lambda x, y: x - 0.1 * y,
                                                                      params, g))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, numpy_acl(np.asarray(tgp.generate(params)), np.asarray(reps),
                                             np.asarray(labels), np.asarray(rvalid), 0.5),
                             rtol=1e-5)


def test_server_ignores_padding_slots_and_trains_separable_prototypes():
  spec = DataSpec((8, 8, 1), L, 5)
  alg = tgp.fedtgp(("mlp_s",), spec, 5, dim=D, server_epochs=50, server_lr=0.1,
                   server_batch_size=4, **KW)
  state = alg.init(jax.random.PRNGKey(0))
  protos, counts, valid = _uploads()
  info = ServerInfo(jnp.int32(0), jnp.arange(5), jnp.array([5, 5, 5, 5, 0]), jnp.asarray(valid))
  server = jax.jit(lambda pr, co: alg.server_update(state, (ProtoUpload(pr, co),), (jnp.ones(5),),
                                                    (info,), jax.random.PRNGKey(3)))
  s1, m1 = server(jnp.asarray(protos), jnp.asarray(counts))
  garbage = protos.copy()
  garbage[4] = 1e3
  s2, _ = server(jnp.asarray(garbage), jnp.asarray(counts))
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert float(m1["server_pairs"]) == ((counts[:4] > 0).sum())
  np.testing.assert_allclose(m1["margin"], numpy_margin(protos, counts, valid, 100.0), rtol=1e-5)
  assert bool(np.all(s1.has))  # every class gets a generated prototype
  np.testing.assert_allclose(s1.protos, tgp.generate(s1.params), rtol=1e-6)
  # Trained on the pairs, the ACL loss of the round's pairs went down.
  up = jnp.asarray(protos[:4].reshape(-1, D))
  labels = jnp.asarray(np.tile(np.arange(L), 4), jnp.int32)
  rv = jnp.asarray((counts[:4] > 0).reshape(-1))
  before = tgp.acl_loss(tgp.generate(state.params), up, labels, rv, m1["margin"])
  after = tgp.acl_loss(s1.protos, up, labels, rv, m1["margin"])
  assert float(after) < float(before)


def test_prototype_inference_is_nearest_prototype():
  spec = DataSpec((8, 8, 1), L, 2)
  alg = tgp.fedtgp(("mlp_s",), spec, 2, dim=D, inference="prototype", **KW)
  pool = alg.pools[0]
  client = pool.init_client(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(L, D)).astype(np.float32)
  has = np.array([True, True, False, True])
  state = tgp.TGPState(alg.init(jax.random.PRNGKey(1)).params, jnp.asarray(protos),
                       jnp.asarray(has))
  x = jnp.asarray(rng.random((6, 8, 8, 1)), jnp.float32)
  logits = pool.apply_fn(pool.eval_params(state, client), x)
  from fedjax_sim.algorithms import rm as rm_lib
  z = np.asarray(rm_lib.split_model("mlp_s", (8, 8, 1), L, D).features(client, x))
  mse = ((z[:, None] - protos[None]) ** 2).mean(-1)
  mse[:, ~has] = np.inf
  np.testing.assert_array_equal(np.argmax(logits, 1), np.argmin(mse, 1))
  with pytest.raises(ValueError, match="inference"):
    tgp.fedtgp(("mlp_s",), spec, 2, inference="nearest", **KW)


def test_trains_on_digits():
  """Six rounds on digits with two architectures: well above chance (10 classes), every
  class has a generated prototype, margins positive and at most tau."""
  import ml_collections
  c = tiny_config(algorithm="fedtgp", rounds=6, clients_per_round=10, rounds_per_call=3,
                  chunk_size=0, batch_size=10, client_lr=0.1)
  c.data.num_clients = 10
  c.archs = ("mlp_s", "mlp_m")
  c.fedtgp = ml_collections.ConfigDict({"server_epochs": 10})
  exp = build_experiment(c)
  res = simulate(exp.algorithm, None, exp.data, seed=0, rounds=6, rounds_per_call=3,
                 eval_every=3, mesh=exp.mesh, eval_initial=False)
  first, last = res.history
  assert last["test_accuracy"] > max(0.4, first["test_accuracy"]), res.history
  assert 0 < last["server/margin"] <= 100.0
  assert bool(np.all(np.asarray(res.state.server.has)))
  assert np.all(np.isfinite(np.asarray(res.state.server.protos)))
