"""Cohort samplers: K distinct valid ids, purity in (key, round), empirical
participation following the availability (against NumPy's own weighted draw
without replacement), the skew reaching 5x, and the fixed schedule."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedjax_sim import sampling


def _cohorts(sampler, rounds, seed=0):
  def one(r):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), r)
    return sampler.sample(key, r, sampler.init())[0]
  return np.asarray(jax.jit(jax.vmap(one))(jnp.arange(rounds, dtype=jnp.int32)))


@pytest.mark.parametrize("name", ["uniform", "availability", "schedule"])
def test_k_distinct_valid_and_pure(name):
  cfg = ml_collections.ConfigDict({"sampler": name, "clients_per_round": 7})
  s = sampling.build_sampler(cfg, 30)
  ids = _cohorts(s, 200)
  assert ids.shape == (200, 7) and ids.dtype == np.int32
  assert ids.min() >= 0 and ids.max() < 30
  assert all(len(set(row)) == 7 for row in ids)
  np.testing.assert_array_equal(ids, _cohorts(s, 200))  # a pure function of (key, round)


def test_availability_frequencies_follow_numpy_weighted_draw():
  C, K, R = 20, 5, 4000
  p = sampling.availability_probs(C, "beta", beta_a=1.0, beta_b=2.0, seed=1)
  got = sampling.participation_frequencies(sampling.availability(p, K), R)
  rng = np.random.default_rng(0)
  want = np.bincount(np.concatenate([rng.choice(C, K, replace=False, p=p) for _ in range(R)]),
                     minlength=C) / R
  # Both estimate the same inclusion probabilities (sd <= 0.008 each).
  np.testing.assert_allclose(got, want, atol=0.04)
  np.testing.assert_allclose(got.sum(), K)
  assert np.corrcoef(got, p)[0, 1] > 0.9


def test_default_power_law_skews_participation_5x():
  """The digits report's setting: the top decile joins >= 5x as often as the bottom."""
  p = sampling.availability_probs(100, "power_law", power=0.75, seed=0)
  f = np.sort(sampling.participation_frequencies(sampling.availability(p, 20), 2000))
  assert f[-10:].mean() / f[:10].mean() >= 5.0
  u = np.sort(sampling.participation_frequencies(sampling.uniform(100, 20), 2000))
  assert u[-10:].mean() / u[:10].mean() < 2.0


def test_fixed_schedule_cycles_and_validates():
  table = np.array([[0, 1, 2], [3, 4, 0]])
  s = sampling.fixed_schedule(table, 5)
  np.testing.assert_array_equal(_cohorts(s, 5), table[[0, 1, 0, 1, 0]])
  with pytest.raises(ValueError, match="repeats"):
    sampling.fixed_schedule(np.array([[0, 0, 1]]), 5)
  with pytest.raises(ValueError):
    sampling.fixed_schedule(np.array([[0, 7, 1]]), 5)


def test_unknown_sampler_and_bad_distribution():
  with pytest.raises(ValueError, match="availability"):
    sampling.build_sampler(ml_collections.ConfigDict({"sampler": "nope",
                                                      "clients_per_round": 2}), 5)
  with pytest.raises(ValueError, match="distribution"):
    sampling.availability_probs(5, "zipf")
