"""FedHeNN (docs/decisions.md#fedhenn): the CKA distance against a NumPy statement, the server's
global representation matrix, the proximal weight schedule, and the round skeleton shared with
CoFED (with weight 0 it is FedMuscle's `local` method)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.algorithms import fedhenn as fh
from fedjax_sim.algorithms import fedmuscle as fm
from fedjax_sim.data import build_multitask_digits
from fedjax_sim.round import init_state, make_mesh, make_round


def _np_hsic(k, l):
  """tr(K H L H) / (n - 1)^2 with the explicit centering matrix H = I - 11^T / n (float64)."""
  n = k.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _np_cka(k, l):
  k, l = np.float64(k), np.float64(l)
  return _np_hsic(k, l) / np.sqrt(_np_hsic(k, k) * _np_hsic(l, l))


def _np_feature_cka(x, y):
  """Linear CKA of feature matrices (Kornblith et al., arXiv 1905.00414):
  ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), columns centered."""
  x, y = np.float64(x), np.float64(y)
  x, y = x - x.mean(0), y - y.mean(0)
  return (np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_cka_distance_matches_numpy():
  rng = np.random.default_rng(0)
  b = 9
  z1, z2 = rng.normal(size=(b, 5)).astype(np.float32), rng.normal(size=(b, 3)).astype(np.float32)
  k1, k2 = fh.representation_kernel(z1), fh.representation_kernel(z2)
  np.testing.assert_allclose(k1, np.float64(z1) @ np.float64(z1).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fh.hsic(k1, k2), _np_hsic(np.float64(k1), np.float64(k2)),
                             rtol=1e-4)
  z1_64, z2_64 = np.float64(z1), np.float64(z2)
  want = _np_cka(z1_64 @ z1_64.T, z2_64 @ z2_64.T)
  np.testing.assert_allclose(fh.cka(k1, k2), want, rtol=1e-4)
  np.testing.assert_allclose(want, _np_feature_cka(z1, z2), rtol=1e-9)  # the two statements agree
  np.testing.assert_allclose(fh.cka_distance(k1, k2), 1.0 - want, rtol=1e-4)
  # Against a global matrix: a mean of several users' kernels (not itself a Z Z^T of one user).
  zs = [rng.normal(size=(b, d)).astype(np.float32) for d in (2, 4, 7)]
  kbar = np.mean([np.float64(z) @ np.float64(z).T for z in zs], axis=0)
  np.testing.assert_allclose(fh.cka_distance(k1, jnp.asarray(kbar, jnp.float32)),
                             1.0 - _np_cka(k1, kbar), rtol=1e-4)


def test_cka_invariances_and_degenerate_kernel():
  """Invariant to isotropic scaling, orthogonal maps and a common shift of the features (CKA's
  properties); a constant representation gives CKA 0 with a finite (zero) gradient."""
  rng = np.random.default_rng(1)
  z = rng.normal(size=(8, 4)).astype(np.float32)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  k = fh.representation_kernel(z)
  for other in (3.0 * z, z @ q.astype(np.float32), z + 2.0):
    np.testing.assert_allclose(fh.cka_distance(k, fh.representation_kernel(other)), 0.0,
                               atol=1e-5)
  const = np.ones((8, 4), np.float32)
  grad = jax.grad(lambda x: fh.cka_distance(fh.representation_kernel(x), k))(const)
  assert float(fh.cka(fh.representation_kernel(const), k)) == 0.0
  assert np.all(np.isfinite(grad))


def test_global_kernel_is_the_mean_over_uploaders():
  rng = np.random.default_rng(2)
  kernels = rng.normal(size=(5, 4, 4)).astype(np.float32)
  uploaded = np.array([True, False, True, True, False])
  np.testing.assert_allclose(fh.global_kernel(kernels, uploaded), kernels[uploaded].mean(0),
                             rtol=1e-6)
  np.testing.assert_array_equal(fh.global_kernel(kernels, np.zeros(5, bool)), 0.0)


def test_eta_schedule_and_knob_checks():
  linear = fh.fedhenn_term(4, eta=0.02, eta_schedule="linear")
  constant = fh.fedhenn_term(4, eta=0.02, eta_schedule="constant")
  np.testing.assert_allclose([linear.weight(jnp.int32(t)) for t in (0, 1, 5)], [0, 0.02, 0.1],
                             rtol=1e-6)
  np.testing.assert_allclose(constant.weight(jnp.int32(5)), 0.02)
  d = _tiny()
  for knobs, match in (({"eta": -1.0}, "fedhenn.eta=-1.0"),
                       ({"eta_schedule": "cosine"}, "eta_schedule"),
                       ({"public_batch": 1}, "B >= 2")):
    with pytest.raises(ValueError, match=match):
      _alg(d, **knobs)


def _tiny(seed=0):
  return build_multitask_digits(num_clients=4, examples_per_user=10, public_per_class=2,
                                seed=seed)


ARCHS = ("mlp_s",)
KW = dict(public_batch=4, proj_dim=4, client_lr=0.05, client_momentum=0.9, batch_size=10)


def _alg(d, **kw):
  return fh.fedhenn(ARCHS, d.aux["tasks"], d.aux["public_x"], input_shape=d.input_shape,
                    task_classes=d.aux["task_classes"], **{**KW, **kw})


@functools.lru_cache(maxsize=None)
def _local_run():
  """FedHeNN with eta = 0, 2 rounds (shared by two tests: one compilation)."""
  return _run(_alg(_tiny(), eta=0.0), _tiny(), 2)


def _run(alg, d, rounds, method=None):
  mesh = make_mesh(1)
  state = fm.with_tasks(init_state(alg, None, 4, seed=0, mesh=mesh), alg, d.aux["tasks"])
  if method:
    state = fm.set_method(state, method)
  round_fn = make_round(alg, seed=0, mesh=mesh, rounds_per_call=1, donate=False)
  states, metrics = [state], []
  for _ in range(rounds):
    state, m = round_fn(state, d.train)
    states.append(state)
    metrics.append(m)
  return states, metrics


def test_round_builds_the_global_matrix_and_applies_the_term():
  """After round t the server holds Kbar = mean over users of Z_u Z_u^T on round t+1's public
  batch, Z_u the user's trained representation (checked in NumPy); the term is off in round 0
  and on from round 1, where it moves the users' models away from plain local training."""
  d = _tiny()
  alg = _alg(d, eta=0.5)
  states, metrics = _run(alg, d, 2)
  um = fm.user_model(ARCHS[0], d.input_shape, KW["proj_dim"], 10)
  for t in (1, 2):
    s = states[t]
    assert int(s.server.ready_round) == t
    x_next = np.asarray(d.aux["public_x"])[np.asarray(fm.public_batch_indices(
        s.server.key, jnp.int32(t), len(d.aux["public_x"]), KW["public_batch"]))]
    zs = [np.float64(um.represent(jax.tree.map(lambda a: a[i], s.clients[0].params), x_next))
          for i in range(4)]
    np.testing.assert_allclose(s.server.term, np.mean([z @ z.T for z in zs], axis=0),
                               rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal([float(m["aligned"][0]) for m in metrics], [0.0, 1.0])
  assert 0 < float(metrics[1]["align_loss"][0]) < 1
  local, _ = _local_run()
  same = lambda a, b: all(np.allclose(x, y, atol=1e-6) for x, y in zip(
      jax.tree.leaves(a.clients[0].params), jax.tree.leaves(b.clients[0].params)))
  assert same(states[1], local[1]) and not same(states[2], local[2])


def test_weight_zero_is_fedmuscle_local_training():
  """With eta = 0 the skeleton's users take FedMuscle's `local` steps: same init, keys, batches."""
  d = _tiny()
  henn, _ = _local_run()
  muscle = fm.fedmuscle(ARCHS, d.aux["tasks"], d.aux["public_x"], input_shape=d.input_shape,
                        task_classes=d.aux["task_classes"], M=1, align_steps=1, **KW)
  local, _ = _run(muscle, d, 2, method="local")
  for a, b in zip(jax.tree.leaves(henn[-1].clients[0].params),
                  jax.tree.leaves(local[-1].clients[0].params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_registry_builder_needs_multitask_data():
  from fedjax_sim.algorithms import registry
  from fedjax_sim.data import build_federated_data
  from fedjax_sim.errors import ConfigError
  from fedjax_sim.launch.configs.fedmuscle_digits import get_config
  cfg = get_config("smoke")
  cfg.archs = ("mlp_s", "mlp_m")
  d = _tiny()
  spec = registry.DataSpec(d.input_shape, d.num_classes, d.num_clients)
  assert registry.knob_defaults("fedhenn") == {"eta": 0.01, "eta_schedule": "linear",
                                               "public_batch": 32, "proj_dim": 32}
  alg = registry.build("fedhenn", registry.BuildContext.from_config(cfg, spec, data=d),
                       {"public_batch": 4, "proj_dim": 4})
  assert [len(p.client_ids) for p in alg.pools] == [2, 2] and alg.evaluate is not None
  plain = build_federated_data({"num_clients": 4}, batch_size=10)
  with pytest.raises(ConfigError, match="--config.data.dataset=digits_multitask"):
    registry.build("fedhenn", registry.BuildContext.from_config(cfg, spec, data=plain), {})
