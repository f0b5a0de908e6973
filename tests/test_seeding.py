"""Independent random streams (fedjax_sim/seeding.py) and their use by the engine."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import sampling, seeding
from fedjax_sim.round import init_state, make_round
from fedjax_sim.launch.experiment import build_experiment


def _bits(key) -> tuple:
  return tuple(np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                          else key).ravel().tolist())


def test_jax_streams_are_distinct_and_never_a_round_key():
  for seed in (0, 1, 7):
    roots = {s: _bits(seeding.jax_key(seed, s)) for s in seeding.JAX_STREAMS}
    assert len(set(roots.values())) == len(roots)
    # Before: the server init key was fold_in(PRNGKey(seed), 0) == round 0's key.
    rounds = {_bits(k) for r in range(20) for k in seeding.round_subkeys(seed, r)}
    rounds |= {_bits(seeding.round_key(seed, r)) for r in range(20)}
    assert roots["init"] not in rounds
    assert _bits(jax.random.fold_in(seeding.jax_key(seed, "client_init"), 0)) not in rounds
  # Different seeds, different streams.
  assert _bits(seeding.jax_key(0, "init")) != _bits(seeding.jax_key(1, "init"))


def test_numpy_streams_are_spawn_children_and_disjoint():
  for seed in (0, 3):
    children = np.random.SeedSequence(seed).spawn(len(seeding.NUMPY_STREAMS))
    for i, name in enumerate(seeding.NUMPY_STREAMS):
      np.testing.assert_array_equal(
          seeding.numpy_rng(seed, name).integers(0, 2**62, 8),
          np.random.default_rng(children[i]).integers(0, 2**62, 8))
  # Run seed s's split stream is not run s+1's partition stream (it was: seed + 1).
  draws = {(s, n): tuple(seeding.numpy_rng(s, n).integers(0, 2**62, 4))
           for s in range(4) for n in seeding.NUMPY_STREAMS}
  assert len(set(draws.values())) == len(draws)


def test_bad_stream_or_seed_is_refused():
  with pytest.raises(ValueError, match="seed=-1"):
    seeding.numpy_seed(-1, "partition")
  with pytest.raises(ValueError, match="unknown NumPy stream"):
    seeding.numpy_seed(0, "nope")
  with pytest.raises(ValueError, match="unknown JAX stream"):
    seeding.jax_key(0, "nope")


def test_schedule_does_not_reuse_the_availability_stream():
  probs = sampling.availability_probs(50, "beta", seed=3)
  # The availabilities are Beta draws of the 'availability' stream ...
  a = np.maximum(seeding.numpy_rng(3, "availability").beta(1.0, 1.0, 50), 1e-6)
  np.testing.assert_allclose(probs, a / a.sum(), rtol=1e-12)
  # ... and the schedule's draws come from the 'schedule' stream of the same seed.
  table = sampling.schedule_from_probs(probs, 5, 4, seed=3)
  rng = seeding.numpy_rng(3, "schedule")
  expect = np.stack([rng.choice(50, 5, replace=False, p=probs / probs.sum()) for _ in range(4)])
  np.testing.assert_array_equal(table, expect)


def test_partition_and_split_streams_change_with_the_seed_only(small_config):
  """Seed s and s+1 partition differently; the train/test split of seed s is no
  longer drawn with run s+1's partition seed."""
  a = build_experiment(small_config).data
  small_config.seed = 1
  b = build_experiment(small_config).data
  assert not np.array_equal(np.asarray(a.train.num_examples), np.asarray(b.train.num_examples))
  small_config.seed = 0
  c = build_experiment(small_config).data
  np.testing.assert_array_equal(np.asarray(a.train.x), np.asarray(c.train.x))


def test_traced_seed_round_equals_static_seed_round(small_config):
  """``make_round(seed=None)`` (one program for all seeds) == ``make_round(seed=s)``."""
  exp = build_experiment(small_config)
  traced = make_round(exp.algorithm, exp.sampler, seed=None, mesh=exp.mesh, chunk_size=2,
                      donate=False)
  for seed in (0, 2):
    static = make_round(exp.algorithm, exp.sampler, seed=seed, mesh=exp.mesh, chunk_size=2,
                        donate=False)
    s0 = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, seed, exp.mesh)
    a, ma = static(s0, exp.data.train)
    b, mb = traced(s0, exp.data.train, seed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(ma["loss"]), np.asarray(mb["loss"]))
  assert traced._cache_size() == 1


def test_seeds_differ_in_init_and_cohorts(small_config):
  exp = build_experiment(small_config)
  inits = [init_state(exp.algorithm, exp.sampler, exp.data.num_clients, s, exp.mesh)
           for s in (0, 1)]
  leaves = [[np.asarray(x) for x in jax.tree.leaves(s.server)] for s in inits]
  assert any(not np.array_equal(x, y) for x, y in zip(*leaves))
  cohorts = [np.asarray(exp.sampler.sample(seeding.round_subkeys(s, 0)[0], 0, ())[0])
             for s in (0, 1)]
  assert not np.array_equal(*cohorts)
