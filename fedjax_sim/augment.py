"""Image augmentations in JAX, for self-supervised clients inside the jitted round.

Used by the federated SSL methods (FedAlignUniform, FedSimCLR, SSD; SSD is
arXiv 2508.01251, see ``docs/decisions.md#ssd``). The official SSD code uses
torchvision's random resized crop, horizontal flip, color jitter and
grayscale on CIFAR. Those are host-side PIL ops; here every op is a pure JAX
function of (key, image), so two views per example are drawn inside
``local_train``'s loss on device, per step, with no host round trip.

What we apply (each example draws its own parameters):

1. Random affine warp (the analogue of random resized crop on small images):
   rotation theta ~ U(-max_rotation_deg, max_rotation_deg), isotropic zoom
   s ~ U(scale_range), shift t ~ U(-max_shift, max_shift)^2 pixels, sampled
   bilinearly (``jax.scipy.ndimage.map_coordinates``, order 1) with zeros
   outside the image. With rotation 0 and zoom 1 it is a random sub-pixel
   shift/crop with zero padding.
2. Horizontal flip with probability ``flip_prob``. **Off (0) for digits**:
   a mirrored digit is not a digit of the same class (a mirrored 3 is an E-like
   shape, 2 and 5 become each other's look-alikes), so treating mirror images
   as positives teaches an invariance the downstream task does not have. SSL
   does not read labels, but the probe does; turn flips on for natural images
   (CIFAR).
3. Intensity scaling x * c, c ~ U(intensity_range) (grayscale "color jitter").
4. Cutout: with probability ``cutout_prob`` a ``cutout_size`` square at a
   random position is zeroed (0 = off).
5. Additive Gaussian noise N(0, noise_std^2), then clip to [0, 1].

Determinism: ``augment_batch(key, x)`` is a pure function of the key (one
``split`` per example), so the same key gives the same views on every device
and in every chunk of the vmapped cohort.

Shapes: B batch, H x W x Ch image (channels last), float32 in [0, 1].

1-D signals (an example of shape [L], e.g. MNIST-1D, arXiv 2011.14439) take the
same knobs along their one axis (:func:`augment_signal`): zoom about the centre
and shift by up to ``max_shift`` samples (linear interpolation, zero fill),
time reversal with ``flip_prob``, intensity, a zeroed segment of
``cutout_size`` samples, Gaussian noise; no rotation, and no clip, since such
signals are standardized rather than in [0, 1].
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class AugmentConfig(NamedTuple):
  """Augmentation strengths (Python floats; part of the jitted program)."""
  max_rotation_deg: float = 15.0
  scale_range: tuple[float, float] = (0.85, 1.15)
  max_shift: float = 1.0  # pixels
  flip_prob: float = 0.0  # 0 for digits (see module docstring)
  intensity_range: tuple[float, float] = (0.75, 1.25)
  cutout_size: int = 0  # pixels; 0 = off
  cutout_prob: float = 0.0
  noise_std: float = 0.05

  @classmethod
  def from_dict(cls, d) -> "AugmentConfig":
    """From a mapping (e.g. a ConfigDict); unknown keys raise ValueError."""
    d = dict(d)
    unknown = set(d) - set(cls._fields)
    if unknown:
      raise ValueError(f"unknown augmentation settings {sorted(unknown)}; known: "
                       f"{', '.join(cls._fields)}.")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _affine(x: jax.Array, theta: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  """Warps one image x float32 [H, W, Ch] about its centre (bilinear, zero fill)."""
  h, w = x.shape[0], x.shape[1]
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  ii, jj = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  # Output pixel p samples the input at R(-theta) (p - c - t) / s + c.
  dy, dx = ii - cy - shift[0], jj - cx - shift[1]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  src_y = (cos * dy + sin * dx) / scale + cy
  src_x = (-sin * dy + cos * dx) / scale + cx
  warp = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [src_y, src_x], order=1,
                                                      mode="constant", cval=0.0)
  return jax.vmap(warp, in_axes=2, out_axes=2)(x)


def augment_signal(key: jax.Array, x: jax.Array,
                   cfg: AugmentConfig = AugmentConfig()) -> jax.Array:
  """One random view of one 1-D signal x float32 [L] -> [L] (see the module docstring)."""
  k_scale, k_shift, k_flip, k_int, k_cut, k_cutpos, k_noise = jax.random.split(key, 7)
  n = x.shape[0]
  c = (n - 1) / 2.0
  scale = jax.random.uniform(k_scale, (), minval=cfg.scale_range[0], maxval=cfg.scale_range[1])
  shift = jax.random.uniform(k_shift, (), minval=-cfg.max_shift, maxval=cfg.max_shift)
  src = (jnp.arange(n, dtype=jnp.float32) - c - shift) / scale + c
  y = jax.scipy.ndimage.map_coordinates(x, [src], order=1, mode="constant", cval=0.0)
  if cfg.flip_prob > 0:
    y = jnp.where(jax.random.bernoulli(k_flip, cfg.flip_prob), y[::-1], y)
  y = y * jax.random.uniform(k_int, (), minval=cfg.intensity_range[0],
                             maxval=cfg.intensity_range[1])
  if cfg.cutout_size > 0 and cfg.cutout_prob > 0:
    pos = jax.random.randint(k_cutpos, (), 0, n)
    box = jnp.abs(jnp.arange(n) - pos) <= cfg.cutout_size // 2
    y = jnp.where(jax.random.bernoulli(k_cut, cfg.cutout_prob) & box, 0.0, y)
  if cfg.noise_std > 0:
    y = y + cfg.noise_std * jax.random.normal(k_noise, y.shape, y.dtype)
  return y


def augment_one(key: jax.Array, x: jax.Array, cfg: AugmentConfig = AugmentConfig()) -> jax.Array:
  """One random view of one image (or of one 1-D signal: :func:`augment_signal`).

  Args:
    key: PRNG key.
    x: float32 [H, W, Ch] in [0, 1], or a signal float32 [L].
    cfg: strengths.

  Returns:
    float32 [H, W, Ch] in [0, 1], or [L].
  """
  if x.ndim == 1:
    return augment_signal(key, x, cfg)
  k_rot, k_scale, k_shift, k_flip, k_int, k_cut, k_cutpos, k_noise = jax.random.split(key, 8)
  h, w = x.shape[0], x.shape[1]
  max_rot = math.radians(cfg.max_rotation_deg)
  theta = jax.random.uniform(k_rot, (), minval=-max_rot, maxval=max_rot)
  scale = jax.random.uniform(k_scale, (), minval=cfg.scale_range[0], maxval=cfg.scale_range[1])
  shift = jax.random.uniform(k_shift, (2,), minval=-cfg.max_shift, maxval=cfg.max_shift)
  y = _affine(x, theta, scale, shift)
  if cfg.flip_prob > 0:
    y = jnp.where(jax.random.bernoulli(k_flip, cfg.flip_prob), y[:, ::-1], y)
  y = y * jax.random.uniform(k_int, (), minval=cfg.intensity_range[0],
                             maxval=cfg.intensity_range[1])
  if cfg.cutout_size > 0 and cfg.cutout_prob > 0:
    cy = jax.random.randint(k_cutpos, (), 0, h)
    cx = jax.random.randint(jax.random.fold_in(k_cutpos, 1), (), 0, w)
    ii, jj = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    half = cfg.cutout_size // 2
    box = (jnp.abs(ii - cy) <= half) & (jnp.abs(jj - cx) <= half)
    on = jax.random.bernoulli(k_cut, cfg.cutout_prob)
    y = jnp.where(on & box[..., None], 0.0, y)
  if cfg.noise_std > 0:
    y = y + cfg.noise_std * jax.random.normal(k_noise, y.shape, y.dtype)
  return jnp.clip(y, 0.0, 1.0)


def augment_batch(key: jax.Array, x: jax.Array, cfg: AugmentConfig = AugmentConfig()) -> jax.Array:
  """Independent random views of a batch: x float32 [B, H, W, Ch] -> [B, H, W, Ch].

  Example b uses ``jax.random.split(key, B)[b]``.
  """
  keys = jax.random.split(key, x.shape[0])
  return jax.vmap(augment_one, in_axes=(0, 0, None))(keys, x, cfg)


def two_views(key: jax.Array, x: jax.Array,
              cfg: AugmentConfig = AugmentConfig()) -> tuple[jax.Array, jax.Array]:
  """Two independent views of each example: x [B, H, W, Ch] -> ([B, ...], [B, ...])."""
  k1, k2 = jax.random.split(key)
  return augment_batch(k1, x, cfg), augment_batch(k2, x, cfg)
