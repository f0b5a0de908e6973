"""FedRE (arXiv 2511.22265), its baselines, RM and communication accounting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import comm, seeding
from fedjax_sim.protocol import ClientInfo, ServerInfo
from fedjax_sim.algorithms import fedre as fedre_lib
from fedjax_sim.algorithms import fedproto as fedproto_lib
from fedjax_sim.algorithms import local_pools as local_pools_lib
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.pooled import DataSpec
from conftest import random_image_clients
from fedjax_sim.round import init_state, make_mesh, make_round

L, D = 4, 3


def _client(seed=0, n=12, n_real=9):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, D)).astype(np.float32)
  y = np.array([0, 0, 1, 3, 3, 3, 1, 0, 3, 2, 2, 2], np.int32)[:n]
  mask = np.arange(n) < n_real  # rows 9.. are padding (class 2 only in padding: absent)
  return z, y, mask


def test_entangle_raw_and_prototype_equal_numpy():
  z, y, mask = _client()
  # Raw representations with fixed weights: r = sum_i w_i z_i, y = sum_i w_i e_{y_i}.
  w = np.where(mask, np.linspace(1, 2, len(y)), 0.0).astype(np.float32)
  w /= w.sum()
  up = fedre_lib.entangle(jnp.asarray(z), jnp.asarray(y), jnp.asarray(w), L)
  np.testing.assert_allclose(up.rep, w @ z, rtol=1e-5)
  np.testing.assert_allclose(up.label, w @ np.eye(L)[y], rtol=1e-5)
  # Prototypes with fixed class weights: r = sum_c v_c p_c over present classes.
  v = np.array([0.5, 0.2, 0.0, 0.3], np.float32)
  protos = np.stack([z[mask & (y == c)].mean(0) if (mask & (y == c)).any() else np.zeros(D)
                     for c in range(L)])
  wi = fedre_lib.proto_example_weights(jnp.asarray(v), jnp.asarray(y), jnp.asarray(mask), L)
  up = fedre_lib.entangle(jnp.asarray(z), jnp.asarray(y), wi, L)
  np.testing.assert_allclose(up.rep, v @ protos, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(up.label, v, rtol=1e-5, atol=1e-7)
  p, counts = rm_lib.class_prototypes(jnp.asarray(z), jnp.asarray(y), jnp.asarray(mask), L)
  np.testing.assert_allclose(p, protos, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(counts, [3, 2, 0, 4])


@pytest.mark.parametrize("variant", fedre_lib.VARIANTS)
@pytest.mark.parametrize("dist", fedre_lib.WEIGHT_DISTRIBUTIONS)
def test_weights_normalized_supported_and_resampled(variant, dist):
  _, y, mask = _client()
  y, mask = jnp.asarray(y), jnp.asarray(mask)
  fn = jax.jit(lambda k: fedre_lib.entangle_weights(k, y, mask, variant=variant,
                                                    distribution=dist, num_classes=L))
  draw = lambda r: np.asarray(fn(jax.random.fold_in(jax.random.PRNGKey(1), r)))
  ws = [draw(r) for r in range(4)]
  for w in ws:
    assert np.all(w >= 0) and abs(w.sum() - 1.0) < 1e-5
    assert np.all(w[~np.asarray(mask)] == 0)  # padding rows never weigh in
  if variant.startswith("VA"):  # plain average: deterministic
    assert all(np.allclose(w, ws[0]) for w in ws)
    return
  assert any(not np.allclose(w, ws[0]) for w in ws[1:]), "weights not resampled across rounds"
  if variant.endswith("P"):  # equal weight within a class (it is a prototype weight)
    for c in range(L):
      sel = np.asarray(mask & (y == c))
      if sel.any():
        assert np.allclose(ws[1][sel], ws[1][sel][0])
  if variant.startswith("RS"):  # one sample / one class
    nz = lambda w: np.unique(np.asarray(y)[w > 0]).size if variant.endswith("P") else (w > 0).sum()
    assert all(nz(w) == 1 for w in ws)


def test_rm_adaptive_pooling_matches_pytorch_bins():
  z = np.arange(10, dtype=np.float32).reshape(2, 5) ** 2
  # AdaptiveAvgPool1d(3) on length 5: bins [0,2), [1,4), [3,5).
  bins = [(0, 2), (1, 4), (3, 5)]
  _, avg = rm_lib.make_rm("avg", 5, 3)
  _, mx = rm_lib.make_rm("max", 5, 3)
  np.testing.assert_allclose(avg({}, jnp.asarray(z)),
                             np.stack([z[:, a:b].mean(1) for a, b in bins], 1), rtol=1e-6)
  np.testing.assert_allclose(mx({}, jnp.asarray(z)),
                             np.stack([z[:, a:b].max(1) for a, b in bins], 1))


def test_fedproto_aggregation_equals_numpy():
  rng = np.random.default_rng(0)
  k = 5
  protos = rng.normal(size=(k, L, D)).astype(np.float32)
  counts = rng.integers(0, 4, size=(k, L)).astype(np.float32)
  counts[:, 2] = 0  # nobody has class 2
  counts[4] = 50.0  # a padding slot with big counts must not count
  valid = np.array([True, True, True, True, False])
  g, has = fedproto_lib.aggregate_prototypes(jnp.asarray(protos), jnp.asarray(counts), jnp.asarray(valid))
  for c in range(L):
    n = counts[:4, c]
    if n.sum() == 0:
      assert not has[c] and np.all(np.asarray(g[c]) == 0)
    else:
      assert has[c]
      np.testing.assert_allclose(g[c], (n[:, None] * protos[:4, c]).sum(0) / n.sum(), rtol=1e-5)


def test_server_ignores_padding_slots():
  spec = DataSpec((8, 8, 1), L, 4)
  alg = fedre_lib.fedre(("mlp_s",), spec, 4, client_lr=0.1, batch_size=4, dim=D)
  state = alg.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  rep = rng.normal(size=(4, D)).astype(np.float32)
  lab = rng.dirichlet(np.ones(L), size=4).astype(np.float32)
  valid = np.array([True, True, False, True])
  info = ServerInfo(jnp.int32(0), jnp.arange(4), jnp.array([5, 5, 0, 5]), jnp.asarray(valid))
  server = jax.jit(lambda up: alg.server_update(state, (up,), (jnp.ones(4),), (info,),
                                                 jax.random.PRNGKey(3)))
  run = lambda r, l: server(fedre_lib.Upload(jnp.asarray(r), jnp.asarray(l)))
  s1, m1 = run(rep, lab)
  rep2, lab2 = rep.copy(), lab.copy()
  rep2[2], lab2[2] = 1e3, np.eye(L)[0]  # garbage in the padding slot
  s2, m2 = run(rep2, lab2)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert float(m1["valid_uploads"]) == 3.0
  assert not np.allclose(s1.head["kernel"], state.head["kernel"])  # the head did train


def _small_data(num_clients=6, n=16, seed=0):
  return random_image_clients(num_clients, n, L, seed)


ARCHS = ("mlp_s", "mlp_l")  # two architectures = two pools (3 pools: tests/test_pools.py)


def test_fedre_round_finite_and_compiled_once():
  spec = DataSpec((8, 8, 1), L, 6)
  data = _small_data()
  alg = fedre_lib.fedre(ARCHS, spec, clients_per_round=4, client_lr=0.05, batch_size=8, dim=D)
  mesh = make_mesh()
  state = init_state(alg, None, 6, seed=0, mesh=mesh)
  round_fn = make_round(alg, seed=0, mesh=mesh, donate=False)
  s1, m1 = round_fn(state, data)
  s2, m2 = round_fn(s1, data)
  assert round_fn._cache_size() == 1
  for m in (m1, m2):
    assert all(np.all(np.isfinite(np.asarray(v))) for v in m.values())
    assert float(m["server/valid_uploads"][0]) == 4.0
    assert float(m["server/comm/upload_scalars"][0]) == 4 * (D + L)
  assert not np.allclose(s2.server.head["kernel"], state.server.head["kernel"])
  # Sampled clients' local extractors changed; the others stay as initialized.
  changed = [bool(np.any(np.asarray(a) != np.asarray(b)))
             for a, b in zip(jax.tree.leaves(s1.clients), jax.tree.leaves(state.clients))]
  assert any(changed)


def test_fixed_weights_stay_across_rounds_and_change_with_the_run_seed():
  """``resample=False``: a client's entangling weights are the same every round
  (the uploaded label encoding y~ depends on the weights only), and differ
  between run seeds (the key is drawn from the run's init key)."""
  spec = DataSpec((8, 8, 1), L, 6)
  data = _small_data()
  alg = fedre_lib.fedre(("mlp_s",), spec, clients_per_round=4, client_lr=0.05, batch_size=8,
                        dim=D, variant="RAR", resample=False)
  pool = alg.pools[0]
  update = jax.jit(pool.client_update)

  def label(seed, round_):
    server = alg.init(seeding.jax_key(seed, "init"))
    params = pool.init_client(jax.random.PRNGKey(0))
    rng = jax.random.fold_in(seeding.round_subkeys(seed, round_)[1], 2)
    info = ClientInfo(jnp.int32(2), jnp.int32(round_), jnp.bool_(True))
    up, _, _ = update(alg.broadcast(server), params, jax.tree.map(lambda a: a[2], data), rng,
                      info)
    return np.asarray(up.label)

  np.testing.assert_array_equal(label(0, 0), label(0, 5))
  assert not np.allclose(label(0, 0), label(1, 0))
  resampled = fedre_lib.fedre(("mlp_s",), spec, clients_per_round=4, client_lr=0.05,
                              batch_size=8, dim=D, variant="RAR")
  assert resampled.init(jax.random.PRNGKey(0)).weight_key is None


def test_comm_accounting_from_shapes():
  spec = DataSpec((8, 8, 1), L, 6)
  data = _small_data()
  alg = fedre_lib.fedre(ARCHS, spec, clients_per_round=4, client_lr=0.05, batch_size=8, dim=D)
  c = comm.round_comm(alg, data)
  assert c["upload_scalars_per_client"] == D + L
  assert c["upload_scalars"] == 4 * (D + L)  # K = 4 split over the two pools as 2 + 2
  assert c["broadcast_scalars"] == 4 * (D * L + L)
  kw = dict(client_lr=0.05, batch_size=8, dim=D, rm="avg", epochs=1, local_steps=0,
            client_momentum=0.0, lr_decay=1.0)
  c = comm.round_comm(fedproto_lib.fedproto(ARCHS, spec, 3, **kw), data)
  assert c["upload_scalars_per_client"] == L * D + L  # dense [L, D] protos + [L] counts
  assert c["broadcast_scalars_per_client"] == L * D + L
  assert comm.round_comm(local_pools_lib.local_pools(ARCHS, spec, 3, **kw), data)["upload_scalars"] == 0
  # Single-pool FedAvg: the upload is a model-sized delta, the broadcast the server state.
  from fedjax_sim import models
  from fedjax_sim.algorithms import fedavg
  model = models.build_model("mlp", L, hidden=(7,))
  init = lambda r: models.init_params(model, r, (8, 8, 1))
  alg = fedavg(lambda p, x: model.apply({"params": p}, x), init, client_lr=0.1, batch_size=8)
  n_params = 64 * 7 + 7 + 7 * L + L
  c = comm.round_comm(alg, data, clients_per_round=5)
  assert c["upload_scalars_per_client"] == n_params and c["upload_scalars"] == 5 * n_params
  # FedAvg's broadcast is its whole server state (params + SGD state, which is empty).
  assert c["broadcast_scalars_per_client"] == n_params


def test_inversion_pair_scores_weighted_and_best_match():
  from fedjax_sim.algorithms import inversion
  recon = np.array([[0.0, 0.0], [1.0, 1.0]])
  targets = np.array([[0.0, 0.1], [0.5, 0.5], [1.0, 1.0]])
  w = np.array([[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]])
  s = inversion.pair_scores(recon, targets, w)
  mse = np.array([[0.005, 0.25, 1.0], [0.905, 0.25, 0.0]])
  psnr = 10 * np.log10(1 / np.maximum(mse, 1e-10))
  np.testing.assert_allclose(s["mse"], np.mean([0.25 * 0.005 + 0.75 * 0.25, 0.0]))
  np.testing.assert_allclose(s["psnr"], np.mean([0.25 * psnr[0, 0] + 0.75 * psnr[0, 1], 100.0]))
  np.testing.assert_allclose(s["best_mse"], np.mean([0.005, 0.0]))
