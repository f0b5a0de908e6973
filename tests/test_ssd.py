"""FedAlignUniform / FedSimCLR / SSD (arXiv 2508.01251): losses, augmentations, metrics, round."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import sampling
from fedjax_sim.protocol import ClientInfo
from fedjax_sim.algorithms import ALGORITHMS
from fedjax_sim.algorithms.losses import nt_xent
from fedjax_sim.algorithms.ssd import (client_block, dsr_basis, dsr_loss, pd_loss, ssd,
                                       ssd_loss)
from fedjax_sim.algorithms.ssl import SSLModel, align_uniform_loss, fedalignuniform, nt_xent_masked
from fedjax_sim.augment import AugmentConfig, augment_batch, two_views
from fedjax_sim.client_data import pack
from fedjax_sim.metrics import l2_normalize
from fedjax_sim.repr_metrics import (alignment, knn_accuracy, linear_probe_accuracy,
                                     make_repr_eval, uniformity)
from fedjax_sim.round import init_state, make_mesh, make_round, replicate


def _unit(rng, n, d):
  z = rng.standard_normal((n, d))
  return z / np.linalg.norm(z, axis=1, keepdims=True)


# ----------------------------------------------------------------- Wang & Isola metrics


def np_uniformity(z, t=2.0):
  n = len(z)
  vals = [np.exp(-t * np.sum((z[i] - z[j]) ** 2)) for i in range(n) for j in range(i + 1, n)]
  return np.log(np.mean(vals))


def np_alignment(z1, z2, alpha=2.0):
  return np.mean(np.linalg.norm(z1 - z2, axis=1) ** alpha)


def test_uniformity_and_alignment_match_numpy_definitions():
  rng = np.random.default_rng(0)
  z1, z2 = _unit(rng, 12, 5), _unit(rng, 12, 5)
  np.testing.assert_allclose(uniformity(jnp.asarray(z1)), np_uniformity(z1), rtol=1e-5)
  np.testing.assert_allclose(uniformity(jnp.asarray(z1), t=0.5), np_uniformity(z1, 0.5),
                             rtol=1e-5)
  np.testing.assert_allclose(alignment(jnp.asarray(z1), jnp.asarray(z2)), np_alignment(z1, z2),
                             rtol=1e-5)
  # Masked: equals the definition on the real rows only.
  mask = np.array([True] * 7 + [False] * 5)
  np.testing.assert_allclose(uniformity(jnp.asarray(z1), jnp.asarray(mask)),
                             np_uniformity(z1[mask]), rtol=1e-5)
  np.testing.assert_allclose(alignment(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(mask)),
                             np_alignment(z1[mask], z2[mask]), rtol=1e-5)
  # Fewer than two real rows: 0 and a finite gradient (no NaN from an empty logsumexp).
  one = jnp.asarray(np.arange(12) == 3)
  assert float(uniformity(jnp.asarray(z1), one)) == 0.0
  g = jax.grad(lambda z: uniformity(z, one))(jnp.asarray(z1))
  assert np.all(np.isfinite(g))


def test_knn_and_linear_probe_separate_clusters_and_respect_bank_mask():
  rng = np.random.default_rng(1)
  centers = 5 * rng.standard_normal((3, 8))
  y = np.repeat(np.arange(3), 20)
  x = centers[y] + 0.1 * rng.standard_normal((60, 8))
  xq, yq = x[::3] + 0.05, y[::3]
  acc = knn_accuracy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq), jnp.asarray(yq),
                     num_classes=3, k=5)
  assert float(acc) == 1.0
  # Masking out every class-0 bank row makes class-0 queries wrong.
  acc_m = knn_accuracy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq), jnp.asarray(yq),
                       num_classes=3, k=5, bank_mask=jnp.asarray(y != 0))
  np.testing.assert_allclose(float(acc_m), np.mean(yq != 0), atol=1e-6)
  lp = linear_probe_accuracy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq), jnp.asarray(yq),
                             num_classes=3, steps=100)
  assert float(lp) == 1.0


# ----------------------------------------------------------------- losses


def test_ssd_loss_with_gamma_delta_zero_is_alignuniform_and_terms_matter():
  rng = np.random.default_rng(2)
  h1, h2, z1, z2 = (jnp.asarray(rng.standard_normal((10, 8)), jnp.float32) for _ in range(4))
  mask = jnp.asarray(np.arange(10) < 8)
  q = client_block(jnp.asarray(dsr_basis(8, 0)), jnp.int32(1), 2)
  base = align_uniform_loss(l2_normalize(z1), l2_normalize(z2), mask, beta=0.7)
  got = ssd_loss(h1, h2, z1, z2, mask, q, beta=0.7, gamma=0.0, delta=0.0)
  np.testing.assert_allclose(got, base, rtol=1e-6)
  # The other two terms are live: each weight alone moves the loss.
  assert abs(float(ssd_loss(h1, h2, z1, z2, mask, q, beta=0.7, gamma=1.0, delta=0.0) - base)) > 1e-4
  assert abs(float(ssd_loss(h1, h2, z1, z2, mask, q, beta=0.7, gamma=0.0, delta=0.1) - base)) > 1e-4


def test_dsr_matches_official_full_basis_form():
  """L_DSR with S = Q, block columns scaled by s: ||z - normalize(z S S^T)||_F / B."""
  rng = np.random.default_rng(3)
  d, block, k, s = 12, 3, 2, np.sqrt(10.0)
  qmat = dsr_basis(d, 5)
  np.testing.assert_allclose(qmat.T @ qmat, np.eye(d), atol=1e-5)
  z = _unit(rng, 6, d).astype(np.float32)
  smat = qmat.copy()
  smat[:, k * block:(k + 1) * block] *= s
  proj = z @ smat @ smat.T
  proj /= np.linalg.norm(proj, axis=1, keepdims=True)
  want = np.linalg.norm(z - proj) / len(z)
  q = client_block(jnp.asarray(qmat), jnp.int32(k), block)
  np.testing.assert_allclose(dsr_loss(jnp.asarray(z), q, s), want, rtol=1e-5)
  # s = 1 leaves z where it is: no pull, zero loss and a finite (zero) gradient.
  assert float(dsr_loss(jnp.asarray(z), q, 1.0)) < 1e-6
  g = jax.grad(lambda a: dsr_loss(l2_normalize(a), q, 1.0))(jnp.asarray(z))
  assert np.all(np.isfinite(g))


def test_pd_loss_is_kl_projector_to_encoder():
  rng = np.random.default_rng(4)
  z, h = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
  sm = lambda a: np.exp(a / 0.5) / np.exp(a / 0.5).sum(1, keepdims=True)
  p, q = sm(z), sm(h)
  want = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
  np.testing.assert_allclose(pd_loss(jnp.asarray(z), jnp.asarray(h)), want, rtol=1e-5)
  assert float(pd_loss(jnp.asarray(z), jnp.asarray(z))) < 1e-6


def test_masked_nt_xent_equals_shared_nt_xent_and_ignores_padding():
  rng = np.random.default_rng(5)
  z1, z2 = (jnp.asarray(rng.standard_normal((6, 4)), jnp.float32) for _ in range(2))
  np.testing.assert_allclose(nt_xent_masked(z1, z2, 0.5), nt_xent(z1, z2, 0.5), rtol=1e-5)
  mask = jnp.asarray(np.arange(6) < 4)
  want = nt_xent(z1[:4], z2[:4], 0.5)
  np.testing.assert_allclose(nt_xent_masked(z1, z2, 0.5, mask), want, rtol=1e-5)
  junk = z1.at[4:].set(100.0)
  np.testing.assert_allclose(nt_xent_masked(junk, z2, 0.5, mask), want, rtol=1e-5)


# ----------------------------------------------------------------- augmentations


def test_augmentations_deterministic_given_key_and_differ_across_keys():
  x = jnp.asarray(np.random.default_rng(6).uniform(size=(4, 8, 8, 1)), jnp.float32)
  cfg = AugmentConfig(cutout_size=3, cutout_prob=0.5, flip_prob=0.5)
  augment = jax.jit(augment_batch, static_argnums=2)
  k = jax.random.PRNGKey(0)
  a, b = augment(k, x, cfg), augment(k, x, cfg)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  c = augment(jax.random.PRNGKey(1), x, cfg)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3
  v1, v2 = jax.jit(two_views, static_argnums=2)(k, x, cfg)
  assert float(jnp.max(jnp.abs(v1 - v2))) > 1e-3  # the two views differ
  # Identity strengths give the input back (the affine warp is exact at theta=0, s=1, t=0).
  ident = AugmentConfig(max_rotation_deg=0.0, scale_range=(1.0, 1.0), max_shift=0.0,
                        intensity_range=(1.0, 1.0), noise_std=0.0)
  np.testing.assert_allclose(augment(k, x, ident), x, atol=1e-6)
  # A whole-pixel shift moves the image by one pixel (zero fill).
  img = jnp.zeros((8, 8, 1)).at[3, 4, 0].set(1.0)
  from fedjax_sim.augment import _affine
  moved = _affine(img, jnp.float32(0.0), jnp.float32(1.0), jnp.array([1.0, 0.0]))
  assert float(moved[4, 4, 0]) == pytest.approx(1.0) and float(moved[3, 4, 0]) == 0.0


# ----------------------------------------------------------------- algorithms and round

SMALL = SSLModel(dim=16, encoder_hidden=(16,), projector_hidden=16)


def _tiny_data(num_clients=4, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  sizes = [6, 3, 8, 5][:num_clients]
  xs = [rng.uniform(size=(n, 8, 8, 1)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 10, n).astype(np.int32) for n in sizes]
  return jax.tree.map(jnp.asarray, pack(xs, ys, batch))


def test_ssd_client_update_with_zero_weights_equals_fedalignuniform():
  data = _tiny_data()
  one = jax.tree.map(lambda a: a[0], data)
  kw = dict(rounds=3, client_lr=0.05, batch_size=4, epochs=1)
  a = ssd(SMALL, (8, 8, 1), num_clients=4, gamma=0.0, delta=0.0, **kw)
  b = fedalignuniform(SMALL, (8, 8, 1), **kw)
  sa, sb = a.init(jax.random.PRNGKey(0)), b.init(jax.random.PRNGKey(0))
  info = ClientInfo(jnp.int32(2), jnp.int32(0), jnp.bool_(True))
  key = jax.random.PRNGKey(3)

  @jax.jit  # one compile for all three updates
  def updates(sa, sb, one):
    ua, _, ma = a.client_update(sa, (), one, key, info)
    ub, _, mb = b.client_update(sb, (), one, key, info)
    # Labels are never read: permuting y must leave the update unchanged.
    uy, _, _ = b.client_update(sb, (), one._replace(y=one.y[::-1]), key, info)
    return ua, ma, ub, mb, uy

  ua, ma, ub, mb, uy = updates(sa, sb, one)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), ua, ub)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), ub, uy)


def test_jitted_ssd_rounds_finite_and_eval_finite():
  data = _tiny_data()
  alg = ssd(SMALL, (8, 8, 1), num_clients=4, rounds=2, client_lr=0.05, batch_size=4, epochs=1)
  sampler = sampling.uniform(4, 3)
  mesh = make_mesh(1)
  state = replicate(init_state(alg, sampler, 4, 0), mesh)
  p0 = state.server.params
  rf = make_round(alg, sampler, seed=0, mesh=mesh, rounds_per_call=2, donate=False)
  new, m = rf(state, replicate(data, mesh))
  assert int(new.round) == 2 and np.all(np.isfinite(np.asarray(m["loss"])))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new.server.params))
  moved = sum(float(jnp.sum(jnp.abs(x - y))) for x, y in
              zip(jax.tree.leaves(new.server.params), jax.tree.leaves(p0)))
  assert moved > 0
  ev = make_repr_eval(lambda p, x: SMALL.apply({"params": p}, x), data, data.x[0], data.y[0],
                      num_classes=10, augment_fn=lambda k, x: augment_batch(k, x),
                      probe_steps=5, pool_size=30)
  out = ev(new.server.params, jax.random.PRNGKey(0))
  assert all(np.isfinite(v) for v in out.values()) and "uniformity_global_enc" in out


def test_registered_and_dsr_rejects_too_many_clients():
  for name in ("ssd", "fedalignuniform", "fedsimclr"):
    assert name in ALGORITHMS
  with pytest.raises(ValueError, match="raise --config.<method>.dim"):
    ssd(SMALL, (8, 8, 1), num_clients=17, rounds=1)
