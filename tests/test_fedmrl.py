"""FedMRL (arXiv 2406.00488): the representation fusion and the nested (Matryoshka) loss
against a NumPy statement, the server's average, and a short training run on digits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fedjax_sim.algorithms import fedmrl as mrl
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.pooled import DataSpec
from fedjax_sim.launch.experiment import build_experiment
from fedjax_sim.protocol import ServerInfo
from fedjax_sim.simulation import simulate

L, D, D1 = 4, 6, 2
KW = dict(client_lr=0.1, batch_size=4, epochs=1, local_steps=0, client_momentum=0.0,
          lr_decay=1.0)


def numpy_ce(logits, y, mask):
  logp = logits - logits.max(1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
  ce = -logp[np.arange(len(y)), y]
  return (ce * mask).sum() / max(mask.sum(), 1)


def _models_and_params(seed=0):
  gmodel = rm_lib.split_model("mlp_s", (8, 8, 1), L, D1)
  lmodel = rm_lib.split_model("mlp_m", (8, 8, 1), L, D)
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"global": gmodel.init(k[0]), "local": lmodel.init(k[1]),
            "proj": rm_lib.init_head(k[2], D1 + D, D)}
  params["proj"]["bias"] = jax.random.normal(k[2], (D,))  # a nonzero bias is part of it too
  return gmodel, lmodel, params


def test_fusion_and_matryoshka_loss_equal_numpy():
  """R~ = [R_G, R_F] W_P + b_P; y^G = R~[:d1] W_G + b_G; y^F = R~ W_F + b_F;
  loss = m1 CE(y^G) + m2 CE(y^F), from the two extractors' outputs in NumPy."""
  gmodel, lmodel, params = _models_and_params()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((7, 8, 8, 1)), jnp.float32)
  y = rng.integers(0, L, 7).astype(np.int32)
  mask = np.array([1, 1, 1, 0, 1, 1, 0], bool)
  p = jax.tree.map(np.asarray, params)
  r_g = np.asarray(gmodel.features(params["global"], x))  # [B, d1]
  r_f = np.asarray(lmodel.features(params["local"], x))  # [B, D]
  fused = np.concatenate([r_g, r_f], 1) @ p["proj"]["kernel"] + p["proj"]["bias"]
  logits_g = fused[:, :D1] @ p["global"]["head"]["kernel"] + p["global"]["head"]["bias"]
  logits_f = fused @ p["local"]["head"]["kernel"] + p["local"]["head"]["bias"]
  np.testing.assert_allclose(mrl.fuse(gmodel, lmodel, params, x), fused, rtol=1e-5, atol=1e-6)
  got_g, got_f = mrl.matryoshka_logits(gmodel, lmodel, params, x)
  np.testing.assert_allclose(got_g, logits_g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_f, logits_f, rtol=1e-5, atol=1e-6)
  loss = jax.jit(lambda m1, m2: mrl.mrl_loss(gmodel, lmodel, params, x, jnp.asarray(y),
                                             jnp.asarray(mask), m1, m2))
  for m1, m2 in ((1.0, 1.0), (0.3, 2.0)):
    want = m1 * numpy_ce(logits_g, y, mask) + m2 * numpy_ce(logits_f, y, mask)
    got = loss(m1, m2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # Nesting: the global head's loss reaches only the first d1 outputs of the projector.
  g = jax.jit(jax.grad(lambda q: mrl.mrl_loss(gmodel, lmodel, q, x, jnp.asarray(y),
                                              jnp.asarray(mask), 1.0, 0.0)))(params)
  assert np.all(np.asarray(g["proj"]["kernel"])[:, D1:] == 0)
  assert np.any(np.asarray(g["proj"]["kernel"])[:, :D1] != 0)
  assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(g["local"]["head"]))


def test_server_averages_uploads_by_examples_ignoring_padding():
  spec = DataSpec((8, 8, 1), L, 4)
  alg = mrl.fedmrl(("mlp_s",), spec, 4, dim=D, d1=D1, **KW)
  state = alg.init(jax.random.PRNGKey(0))
  ups = jax.vmap(alg.init)(jax.random.split(jax.random.PRNGKey(1), 4))
  n = np.array([3.0, 5.0, 9.0, 0.0], np.float32)
  valid = np.array([True, True, True, False])
  info = ServerInfo(jnp.int32(0), jnp.arange(4), jnp.asarray(n, jnp.int32), jnp.asarray(valid))
  new, metrics = jax.jit(alg.server_update)(state, (ups,), (jnp.asarray(n),), (info,),
                                            jax.random.PRNGKey(2))
  for got, u in zip(jax.tree.leaves(new), jax.tree.leaves(ups)):
    u = np.asarray(u)
    np.testing.assert_allclose(got, np.tensordot(n[:3], u[:3], 1) / n[:3].sum(), rtol=1e-5,
                               atol=1e-6)
  size = sum(np.asarray(a).size for a in jax.tree.leaves(state))
  assert float(metrics["comm/upload_scalars"]) == 3 * size
  with pytest.raises(ValueError, match="d1"):
    mrl.fedmrl(("mlp_s",), spec, 4, dim=D, d1=D + 1, **KW)


def test_trains_on_digits():
  """Six rounds on digits with two architectures: well above chance (10 classes); the shared
  model and every client's projector moved."""
  c = tiny_config(algorithm="fedmrl", rounds=6, clients_per_round=10, rounds_per_call=3,
                  chunk_size=0, batch_size=10, client_lr=0.1)
  c.data.num_clients = 10
  c.archs = ("mlp_s", "mlp_m")
  exp = build_experiment(c)
  alg = exp.algorithm
  res = simulate(alg, None, exp.data, seed=0, rounds=6, rounds_per_call=3, eval_every=3,
                 mesh=exp.mesh, eval_initial=False)
  first, last = res.history
  assert last["test_accuracy"] > max(0.5, first["test_accuracy"]), res.history
  from fedjax_sim import seeding
  from fedjax_sim.round import init_state
  init = alg.init(seeding.jax_key(0, "init"))
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(res.state.server), jax.tree.leaves(init)))
  start = init_state(alg, None, exp.data.num_clients, seed=0, mesh=exp.mesh)
  for p, pool in enumerate(alg.pools):  # every client joined every round: every P_k moved
    proj = np.asarray(res.state.clients[p]["proj"]["kernel"])
    assert proj.shape == (len(pool.client_ids), 8 + 32, 32)  # [C_p, d1 + D, D]
    moved = np.any(proj != np.asarray(start.clients[p]["proj"]["kernel"]), axis=(1, 2))
    assert np.all(moved)
