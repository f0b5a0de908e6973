"""FedMuscle: the Muscle loss against its formula (docs/decisions.md#fedmuscle), the round."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.algorithms import fedmuscle as fm
from fedjax_sim.algorithms import losses

TAU_N, TAU_N1 = 0.2, 0.15


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _brute_force_muscle(anchor, others, tau_n=TAU_N, tau_n1=TAU_N1):
  """The paper's formula, one negative combination j in [B]^M at a time (float64)."""
  a, o = np.float64(anchor), np.float64(others)
  m_count, b = o.shape[:2]
  gamma = 1.0 / tau_n1 - 1.0 / tau_n

  def log_term(i, j):
    sim = sum(a[i] @ o[m, j[m]] for m in range(m_count)) / tau_n
    log_alpha = -0.5 * gamma * sum(o[m, j[m]] @ o[mp, j[mp]] for m in range(m_count)
                                   for mp in range(m_count) if mp != m)
    return sim + log_alpha

  total = 0.0
  for i in range(b):
    den = np.logaddexp.reduce([log_term(i, j)
                               for j in itertools.product(range(b), repeat=m_count)])
    total += den - log_term(i, (i,) * m_count)
  return total / b


def test_muscle_with_two_models_is_info_nce():
  """N = 2 (M = 1): alpha = 1, so the loss is InfoNCE at tau_N, computed here from its formula."""
  rng = np.random.default_rng(0)
  a, p = _unit(rng, 6, 5), _unit(rng, 6, 5)
  logits = a.astype(np.float64) @ p.T.astype(np.float64) / TAU_N
  formula = np.mean([-(logits[i, i] - np.logaddexp.reduce(logits[i])) for i in range(6)])
  np.testing.assert_allclose(losses.muscle_loss(a, p[None], TAU_N, TAU_N1), formula, rtol=1e-5)
  np.testing.assert_allclose(losses.info_nce(a, p, TAU_N), formula, rtol=1e-5)
  np.testing.assert_allclose(losses.pairwise_info_nce(a, p[None], TAU_N), formula, rtol=1e-5)


@pytest.mark.parametrize("m_count,b", [(2, 4), (3, 3), (4, 3)])
def test_vectorized_muscle_equals_brute_force_over_all_combinations(m_count, b):
  rng = np.random.default_rng(m_count)
  a, o = _unit(rng, b, 5), _unit(rng, m_count, b, 5)
  want = _brute_force_muscle(a, o)
  np.testing.assert_allclose(losses.muscle_loss(a, o), want, rtol=2e-5)
  np.testing.assert_allclose(losses.muscle_loss_dense(a, o), want, rtol=2e-5)


def test_alpha_weights_differ_from_pairwise():
  """With M >= 2 the weights matter: gamma = 0 (tau_N-1 = tau_N) gives a different value."""
  rng = np.random.default_rng(7)
  a, o = _unit(rng, 4, 5), _unit(rng, 2, 4, 5)
  weighted = float(losses.muscle_loss(a, o, TAU_N, TAU_N1))
  unweighted = float(losses.muscle_loss(a, o, TAU_N, TAU_N))
  np.testing.assert_allclose(unweighted, _brute_force_muscle(a, o, TAU_N, TAU_N), rtol=2e-5)
  assert abs(weighted - unweighted) > 1e-3


def test_muscle_is_stable_for_aligned_representations():
  """Perfectly aligned, widely spread tuples: large logits, no overflow or NaN."""
  rng = np.random.default_rng(3)
  a = _unit(rng, 8, 16)
  o = np.stack([a] * 4)
  val = losses.muscle_loss(a, o)
  assert np.isfinite(val)
  np.testing.assert_allclose(val, losses.muscle_loss_dense(a, o), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m_count", [1, 2, 3, 4])
def test_gradients_finite_and_match_dense(m_count):
  rng = np.random.default_rng(10 + m_count)
  b, d = 6, 8
  raw, o = rng.normal(size=(b, d)).astype(np.float32), _unit(rng, m_count, b, d)
  f = lambda fn: jax.grad(lambda x: fn(losses.l2_normalize(x), o))(jnp.asarray(raw))
  g = f(losses.muscle_loss)
  assert np.all(np.isfinite(g)) and np.any(np.abs(g) > 0)
  np.testing.assert_allclose(g, f(losses.muscle_loss_dense), rtol=1e-4, atol=1e-6)
  for loss in (lambda z, x: losses.pairwise_info_nce(z, x, TAU_N),
               lambda z, x: losses.gram_volume_loss(z, x, TAU_N)):
    assert np.all(np.isfinite(f(loss)))


def test_gram_volume_is_the_parallelotope_volume():
  """Two unit vectors at angle theta span area sin(theta); a repeated vector spans none."""
  theta = 0.3
  v = jnp.array([[1.0, 0.0, 0.0], [np.cos(theta), np.sin(theta), 0.0]])
  np.testing.assert_allclose(losses.gram_volume(v), np.sin(theta), rtol=1e-5)
  np.testing.assert_allclose(losses.gram_volume(jnp.stack([v[0], v[0]])), 0.0, atol=1e-5)


def test_delta_percent():
  np.testing.assert_allclose(fm.delta_percent([0.6, 0.9], [0.5, 1.0]), (20.0 - 10.0) / 2)


def test_public_split_is_disjoint_from_users_and_tasks_map_labels():
  d = fm.build_multitask_digits(num_users=8, examples_per_user=20, public_per_class=5, seed=1)
  from fedjax_sim.data import sources
  ds = sources.load_digits()
  assert d.public_x.shape == (50, 8, 8, 1)
  assert np.all(np.bincount(ds.train_y[d.public_idx]) == 5)
  pub = {ds.train_x[i].tobytes() for i in d.public_idx}
  x, m = np.asarray(d.train.x), np.asarray(d.train.mask)
  for u in range(8):  # no user example equals a public one (digits has few exact duplicates)
    assert not any(x[u, n].tobytes() in pub for n in np.flatnonzero(m[u]))
  label_map, _ = fm.task_tables()
  for u, t in enumerate(d.tasks):
    np.testing.assert_array_equal(np.asarray(d.test.y[u]), label_map[t][ds.test_y])
  assert max(np.asarray(d.train.y)[d.tasks == fm.TASK_NAMES.index("parity")].ravel()) <= 1


def test_round_aligns_from_round_one_and_local_never_aligns():
  """Tiny 2-pool, 4-user round: uploads stored, alignment only with others' fresh matrices."""
  from fedjax_sim.round import init_state, make_mesh, make_round
  d = fm.build_multitask_digits(num_users=4, examples_per_user=10, public_per_class=2, seed=0)
  alg = fm.fedmuscle(("mlp_s", "mlp_m"), d.tasks, d.public_x, input_shape=d.input_shape, M=2,
                     public_batch=4, proj_dim=4, align_steps=1, batch_size=10)
  mesh = make_mesh(1)
  round_fn = make_round(alg, seed=0, mesh=mesh, rounds_per_call=2, donate=False)
  state = fm.with_tasks(init_state(alg, None, 4, seed=0, mesh=mesh), alg, d.tasks)
  out, m = round_fn(state, d.train)
  np.testing.assert_array_equal(m["aligned"], [0.0, 1.0])
  assert np.all(np.isfinite(m["align_loss"])) and m["align_loss"][1] > 0
  np.testing.assert_array_equal(out.server.rep_round, [1, 1, 1, 1])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out.server.reps), axis=-1), 1.0, rtol=1e-5)
  out_l, m_l = round_fn(fm.set_method(state, "local"), d.train)
  np.testing.assert_array_equal(m_l["aligned"], [0.0, 0.0])
  # Round 0 is identical (no alignment yet); round 1 differs only through alignment.
  p0 = jax.tree.leaves(out.clients[0].params)
  p0_l = jax.tree.leaves(out_l.clients[0].params)
  assert any(not np.allclose(a, b) for a, b in zip(p0, p0_l))
  np.testing.assert_array_equal(np.asarray(out.clients[1].task), d.tasks[alg.pools[1].client_ids])
