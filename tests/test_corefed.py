"""CoRe-Fed: each mechanism against a plain NumPy computation of its formula,
the server step (storage, window, reuse, age cap, padding) against NumPy, an
equivalence with FedAvg, the fairness/representation metrics against their
definitions (docs/decisions.md#fairness-metrics), and a short jitted end-to-end run."""
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import metrics
from fedjax_sim.launch import experiment
from fedjax_sim.protocol import ServerInfo
from fedjax_sim.algorithms import corefed as cf
from fedjax_sim.round import make_round


def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_alignment_loss_is_nt_xent():
  rng = np.random.default_rng(0)
  z, zg = rng.normal(size=8), rng.normal(size=8)
  negs = rng.normal(size=(5, 8))
  mask = np.array([True, False, True, True, False])
  tau = 0.07
  got = jax.jit(cf.alignment_loss, static_argnums=4)(jnp.asarray(z, jnp.float32), jnp.asarray(zg, jnp.float32),
                          jnp.asarray(negs, jnp.float32), jnp.asarray(mask), tau)
  a, p, n = _unit(z), _unit(zg), _unit(negs)[mask]
  pos = np.exp(a @ p / tau)
  want = -np.log(pos / (pos + np.sum(np.exp(n @ a / tau))))
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  # A zero anchor (empty batch) keeps a finite gradient.
  g = jax.jit(jax.grad(lambda v: cf.alignment_loss(v, jnp.asarray(zg, jnp.float32),
                                           jnp.asarray(negs, jnp.float32), jnp.asarray(mask),
                                           tau)))(jnp.zeros(8))
  assert np.all(np.isfinite(np.asarray(g)))


def test_distillation_target_and_update():
  rng = np.random.default_rng(1)
  z, zg = _unit(rng.normal(size=6)), _unit(rng.normal(size=6))
  beta = 0.5
  rho = z @ zg
  want = z + beta * (rho * zg - z)
  got = cf.distillation_target(jnp.asarray(z), jnp.asarray(zg), beta)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # Loss ||z - stopgrad(z~)||^2 and its gradient 2 (z - z~): one gradient step
  # with lr eta moves z to z - 2 eta (z - z~) (the distillation update).
  val, grad = jax.value_and_grad(cf.distillation_loss)(jnp.asarray(z), jnp.asarray(zg), beta)
  np.testing.assert_allclose(float(val), np.sum((z - want) ** 2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), 2 * (z - want), rtol=1e-5, atol=1e-6)
  # beta = 0: no pull at all.
  assert float(cf.distillation_loss(jnp.asarray(z), jnp.asarray(zg), 0.0)) == 0.0


def test_contribution_weights_formula():
  f = np.array([0.2, 0.4, 1.0, 0.6, 0.2]) + 1e-8
  rho = np.array([0.9, 0.5, -0.2, 0.99, 0.1])
  elig = np.array([True, True, True, False, True])
  for gamma, k in [(0.5, 2.0), (2.0, 0.5), (0.5, 0.5), (2.0, 2.0)]:
    w = (1 / f) ** gamma / (1 + np.exp(-k * rho)) * elig
    want = w / w.sum()
    got = cf.contribution_weights(jnp.asarray(f, jnp.float32), jnp.asarray(rho, jnp.float32),
                                  jnp.asarray(elig), gamma=gamma, k=k)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def _toy(reuse=True, contribution=True, reference_code=False, window=3, max_age=-1, C=6, D=3):
  """A corefed instance on a 1-leaf 'model' to test the server step alone."""
  init_params = lambda rng: {"w": jnp.zeros((4,), jnp.float32)}
  return cf.corefed(lambda p, x: x, init_params, lambda p, x: (x, x), num_clients=C,
                    embed_dim=D, clients_per_round=2, client_lr=0.1, batch_size=1,
                    contribution=contribution, reuse=reuse, reference_code=reference_code,
                    window=window, max_age=max_age, gamma=0.5, k=2.0)


def test_server_step_matches_numpy_with_reuse_window_and_padding():
  C, D, tau = 6, 3, 3
  alg = _toy(window=tau, max_age=1, C=C, D=D)
  s = alg.init(jax.random.PRNGKey(0))
  step = jax.jit(alg.server_update)
  rng = np.random.default_rng(2)
  # Rounds: cohort (padded to 3 slots, last slot invalid and duplicating an id).
  cohorts = [[0, 1], [2, 3], [0, 4], [5, 2], [1, 3]]
  stored, last, zs, hist = np.zeros((C, 4)), -np.ones(C, int), np.zeros((C, D)), []
  params = np.zeros(4)
  for r, ids in enumerate(cohorts):
    deltas = rng.normal(size=(3, 4)).astype(np.float32)
    z = _unit(rng.normal(size=(3, D))).astype(np.float32)
    slot_ids = np.array(ids + [ids[-1]])
    valid = np.array([True, True, False])
    info = ServerInfo(jnp.int32(r), jnp.asarray(slot_ids, jnp.int32), jnp.array([5, 7, 0]),
                      jnp.asarray(valid))
    s, m = step(s, {"delta": {"w": jnp.asarray(deltas)}, "z": jnp.asarray(z)},
                jnp.array([5.0, 7.0, 0.0]), info, None)
    # NumPy reference.
    zg = _unit(z[:2].mean(0))
    for j, c in enumerate(ids):
      stored[c], last[c], zs[c] = deltas[j], r, z[j]
    hist.append(set(ids))
    f = np.array([sum(c in h for h in hist[-tau:]) / tau for c in range(C)]) + 1e-8
    age = r - last
    elig = (last >= 0) & (age <= 1)
    w = (1 / f) ** 0.5 / (1 + np.exp(-2.0 * (zs @ zg))) * elig
    w /= w.sum()
    params = params - w @ stored
    np.testing.assert_allclose(np.asarray(s.params["w"]), params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["reused_clients"]), elig.sum() - 2)
    np.testing.assert_allclose(float(m["repr_disparity"]), np.mean(1 - z[:2] @ zg), rtol=1e-5,
                               atol=1e-6)
  assert int(m["reused_clients"]) == 2  # round 4: 5 and 2 (age 1) reused; 0 and 4 (age 2) not


def test_reference_code_weights_only_sampled_clients():
  alg = _toy(reference_code=True)
  s = alg.init(jax.random.PRNGKey(0))
  assert s.stored_update == ()
  deltas = np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [9.0, 9, 9, 9]], np.float32)
  z = _unit(np.array([[1.0, 0, 0], [1.0, 1.0, 0], [0, 0, 1.0]])).astype(np.float32)
  info = ServerInfo(jnp.int32(0), jnp.array([3, 1, 1]), jnp.array([5, 7, 0]),
                    jnp.array([True, True, False]))
  s, _ = alg.server_update(s, {"delta": {"w": jnp.asarray(deltas)}, "z": jnp.asarray(z)},
                           jnp.array([5.0, 7.0, 0.0]), info, None)
  zg = _unit(z[:2].mean(0))
  w = (1 / (1 / 3 + 1e-8)) ** 0.5 / (1 + np.exp(-2.0 * (z[:2] @ zg)))
  w /= w.sum()
  np.testing.assert_allclose(np.asarray(s.params["w"]), -(w @ deltas[:2]), rtol=1e-5)


def test_reuse_requires_contribution():
  with pytest.raises(ValueError, match="reuse"):
    _toy(reuse=True, contribution=False)


def test_fairness_metrics_match_spec_definitions():
  acc = np.array([0.9, 0.5, 0.75, 1.0, 0.6, 0.8, 0.95, 0.3, 0.7, 0.85, 0.65])
  out = metrics.accuracy_spread(acc)
  ones = np.ones_like(acc)
  np.testing.assert_allclose(out["d_cosine"], np.arccos(acc @ ones / (np.linalg.norm(acc) *
                                                                       np.linalg.norm(ones))))
  np.testing.assert_allclose(out["d_manhattan"], 100 * np.abs(acc - acc.mean()).sum())
  np.testing.assert_allclose(out["client_acc_var"], np.var(acc))
  np.testing.assert_allclose(out["client_acc_worst10"], np.mean(np.sort(acc)[:2]))  # ceil(1.1)
  np.testing.assert_allclose(out["jain_index"], acc.sum() ** 2 / (len(acc) * (acc ** 2).sum()))
  assert metrics.accuracy_spread(np.full(5, 0.7))["d_cosine"] < 1e-6


def test_representation_disparity_numpy():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(7, 4))
  valid = np.array([1, 1, 0, 1, 1, 1, 0], bool)
  d, zg = metrics.representation_disparity(jnp.asarray(z, jnp.float32), jnp.asarray(valid))
  zn = _unit(z)[valid]
  g = _unit(zn.mean(0))
  np.testing.assert_allclose(float(d), np.mean(1 - zn @ g), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(zg), g, rtol=1e-5)


def test_l2_normalize_rsqrt_form_is_corefeds_formula():
  """rsqrt=True evaluates z * rsqrt(max(sum z^2, eps^2)) exactly (the form CoRe-Fed's committed
  results were computed with); it agrees with the default form to rounding and its gradient is
  finite at a zero row."""
  rng = np.random.default_rng(6)
  z = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32).at[2].set(0.0)
  got = jax.jit(lambda z: metrics.l2_normalize(z, rsqrt=True))(z)
  want = jax.jit(lambda z: z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True),
                                                         1e-12 * 1e-12)))(z)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_allclose(np.asarray(got), np.asarray(metrics.l2_normalize(z)), rtol=1e-6)
  assert np.all(np.asarray(got[2]) == 0.0)
  g = jax.grad(lambda z: jnp.sum(metrics.l2_normalize(z, rsqrt=True) ** 3))(z)
  assert np.all(np.isfinite(np.asarray(g)))


def test_repr_eval_disparity_over_clients_numpy():
  """make_repr_eval(metrics=("disparity",)): z_i = normalize(mean of client i's real rows of z),
  clients without rows excluded, against NumPy; an unknown group, and "quality" without a test
  set, are ConfigErrors."""
  from fedjax_sim.client_data import pack
  from fedjax_sim.errors import ConfigError
  from fedjax_sim.repr_metrics import make_repr_eval
  rng = np.random.default_rng(4)
  xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (4, 1, 0, 6, 2)]
  train = pack(xs, [np.zeros(len(x), np.int32) for x in xs])
  w = rng.normal(size=(3, 5)).astype(np.float32)
  ev = make_repr_eval(lambda p, x: (x, x @ p), train, metrics=("disparity",), client_chunk=2)
  out = ev(jnp.asarray(w))
  zi = _unit(np.stack([(x @ w).mean(0) for x in xs if len(x)]))
  g = _unit(zi.mean(0))
  np.testing.assert_allclose(out["repr_disparity"], np.mean(1 - zi @ g), rtol=1e-5, atol=1e-7)
  emb = out["client_embedding"]
  assert emb.shape == (5, 5) and np.all(emb[2] == 0.0)
  np.testing.assert_allclose(np.delete(emb, 2, 0), zi, rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="metrics"):
    make_repr_eval(lambda p, x: (x, x), train, metrics=("uniformity",))
  with pytest.raises(ConfigError, match="test_x"):
    make_repr_eval(lambda p, x: (x, x), train)


@pytest.fixture(scope="module")
def tiny():
  """12 digits clients, 4 per round (availability sampler), MLP 64-16-10: built once."""
  from fedjax_sim.launch.configs.base import get_base_config
  c = get_base_config()
  c.algorithm, c.sampler, c.progress = "corefed", "availability", False
  c.data.num_clients, c.clients_per_round, c.chunk_size = 12, 4, 0
  c.model_kwargs.hidden = (16,)
  return c, experiment.build_experiment(c)


def _algorithm(tiny, name, **knobs):
  from fedjax_sim.launch.experiment import build_algorithm
  c, exp = tiny
  c = c.copy_and_resolve_references()
  c.algorithm = name
  c[name] = ml_collections.ConfigDict(knobs)
  from fedjax_sim.algorithms.registry import DataSpec
  spec = DataSpec(exp.data.input_shape, exp.data.num_classes, exp.data.num_clients)
  return build_algorithm(c, spec, exp.data)[0]


def test_refed_without_loss_terms_equals_fedavg(tiny):
  """Re-Fed with lambda_c = lambda_d = 0 trains on CE only and uses FedAvg weights."""
  from fedjax_sim.protocol import ClientInfo
  _, exp = tiny
  fedavg = _algorithm(tiny, "fedavg")
  refed = _algorithm(tiny, "refed", lambda_c=0.0, lambda_d=0.0)
  params = fedavg.init(jax.random.PRNGKey(0)).params
  s = refed.init(jax.random.PRNGKey(0))._replace(has_global=jnp.bool_(True))
  s = s._replace(z_global=metrics.l2_normalize(jnp.ones_like(s.z_global), rsqrt=True))
  data = jax.tree.map(lambda a: a[3], exp.data.train)
  info = ClientInfo(jnp.int32(3), jnp.int32(1), jnp.bool_(True))
  key = jax.random.PRNGKey(1)

  @jax.jit
  def both(params, s):
    d_avg = fedavg.client_update(fedavg.init(key)._replace(params=params), (), data, key, info)[0]
    up = refed.client_update(refed.broadcast(s._replace(params=params)), (), data, key, info)[0]
    return d_avg, up["delta"]

  d_avg, d_re = both(params, s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-6), d_avg, d_re)
  assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(d_re)) > 0
  # With the terms on, the same client moves differently (the terms train).
  refed_on = _algorithm(tiny, "refed")
  up_on = jax.jit(lambda s: refed_on.client_update(refed_on.broadcast(s), (), data, key, info))(
      s._replace(params=params))[0]
  assert not np.allclose(np.asarray(jax.tree.leaves(up_on["delta"])[0]),
                         np.asarray(jax.tree.leaves(d_re)[0]))


def test_corefed_end_to_end_jitted_finite_no_retrace(tiny):
  from fedjax_sim.round import SimState, replicate
  c, exp = tiny
  alg = exp.algorithm
  st = replicate(SimState(jnp.int32(0), jax.jit(alg.init)(jax.random.PRNGKey(0)), (),
                          exp.sampler.init()), exp.mesh)
  rf = make_round(alg, exp.sampler, seed=c.seed, mesh=exp.mesh, rounds_per_call=2)
  for _ in range(3):
    st, m = rf(st, exp.data.train)
  assert rf._cache_size() == 1
  assert int(st.round) == 6
  for k, v in m.items():
    assert np.all(np.isfinite(np.asarray(v))), k
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(st.server))
  assert float(np.asarray(m["align_loss"]).mean()) > 0  # alignment active after round 0
  assert float(np.asarray(m["server/reused_clients"]).mean()) > 0
  # State bookkeeping: the last round's cohort carries round 5; window tau = 12 // 4 = 3.
  assert int(np.sum(np.asarray(st.server.last_round) == 5)) == 4
  assert int(np.asarray(st.server.window).sum()) == 3 * 4


def test_reuse_needs_a_window_longer_than_one_round():
  """tau = 1 leaves no room for reuse (f_i would be 0, weight ~1e4); max_age > tau - 1 is refused."""
  import pytest
  from fedjax_sim.algorithms.corefed import corefed
  kw = dict(apply_fn=lambda p, x: x, embed_fn=None, init_params=lambda r: {"w": jnp.zeros(2)},
            num_clients=10, clients_per_round=6, embed_dim=2, client_lr=0.1, batch_size=2)
  corefed(**kw)  # tau = 10 // 6 = 1 -> age cap 0: builds, reuses nothing
  with pytest.raises(ValueError, match="max_age"):
    corefed(**kw, max_age=1)
