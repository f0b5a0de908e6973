"""1-D views of signals (``fedjax_sim.augment.augment_signal``, used for MNIST-1D, arXiv 2011.14439).

Each view is checked against a NumPy statement of the same warp; ranges that
are drawn at random are pinned (e.g. ``scale_range=(s, s)``) so the draw is known.
"""
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.augment import AugmentConfig, augment_batch, augment_signal

def warp(x, src):
  """x sampled at positions src by linear interpolation, zero beyond the samples (the value
  ramps from the edge sample to 0 over one step, as jax.scipy.ndimage.map_coordinates does)."""
  n = x.shape[0]
  return np.interp(src, np.arange(-1, n + 1), np.concatenate([[0.0], x, [0.0]]))


PLAIN = dict(scale_range=(1.0, 1.0), max_shift=0.0, intensity_range=(1.0, 1.0), noise_std=0.0)
X = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32)  # standardized, like MNIST-1D


def test_identity_and_time_reversal():
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(augment_batch(key, jnp.asarray(X), AugmentConfig(**PLAIN)), X)
  flipped = augment_batch(key, jnp.asarray(X), AugmentConfig(**PLAIN, flip_prob=1.0))
  np.testing.assert_array_equal(flipped, X[:, ::-1])


def test_zoom_and_intensity_equal_numpy_interpolation_without_clipping():
  s, c = 1.25, 1.7
  cfg = AugmentConfig(**{**PLAIN, "scale_range": (s, s), "intensity_range": (c, c)})
  n = X.shape[1]
  centre = (n - 1) / 2.0
  src = (np.arange(n) - centre) / s + centre  # zoom about the centre, zero outside the signal
  want = c * warp(X[0], src)
  got = augment_signal(jax.random.PRNGKey(3), jnp.asarray(X[0]), cfg)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.min(got)) < 0.0  # signals are not clipped to [0, 1] as images are


def test_shift_and_noise_stay_within_their_ranges():
  cfg = AugmentConfig(**{**PLAIN, "max_shift": 3.0})
  views = np.asarray(augment_batch(jax.random.PRNGKey(1), jnp.asarray(np.tile(X[:1], (64, 1))),
                                   cfg))
  n = X.shape[1]
  shifts = np.linspace(-3.0, 3.0, 601)  # each view is the signal moved by some t in [-3, 3]
  grid = np.stack([warp(X[0], np.arange(n) - t) for t in shifts])
  err = np.abs(views[:, None, :] - grid[None]).max(-1).min(-1)
  assert err.max() < 0.05 and len(np.unique(views.round(4), axis=0)) > 32
  noisy = augment_signal(jax.random.PRNGKey(2), jnp.asarray(X[0]),
                         AugmentConfig(**{**PLAIN, "noise_std": 0.1}))
  assert 0.05 < float(jnp.std(noisy - X[0])) < 0.2
