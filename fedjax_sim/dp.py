"""Client-level differential privacy: DP-FedAvg's clipped, noised aggregation, inside the round.

:func:`private` wraps a :class:`~fedjax_sim.protocol.FederatedAlgorithm` whose
upload is a model delta (FedAvg, FedProx, the FedOpt family) into its
client-level DP version (McMahan et al., "Learning Differentially Private
Recurrent Language Models", arXiv 1710.06963, Algorithm 1, DP-FedAvg with
the fixed-denominator estimator and uniform weights):

* each client clips its delta to L2 norm C: Delta_i * min(1, C / ||Delta_i||)
  (:func:`clip_by_norm`);
* the server sums the cohort's clipped deltas, adds Gaussian noise
  N(0, (z C)^2) per coordinate and divides by the EXPECTED cohort size m
  (q*C for Poisson sampling, K for a fixed-size cohort), not by the number of
  clients that came (the estimator whose sensitivity is C / m);
* the wrapped algorithm's server update then runs on that one noised mean
  delta (upload [1, ...], weight 1), so its server optimizer (FedAdam, ...)
  sees a private pseudo-gradient: DP-FedAdam and so on.

Adaptive clipping (Andrew et al., "Differentially Private Learning with
Adaptive Clipping", arXiv 1905.03871, Algorithm 1 with the geometric update)
tracks the target quantile gamma of the update norms: each client also
reports b_i = 1[||Delta_i|| <= C]; the server estimates the fraction
b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2 (the centred bits of
TensorFlow Privacy's quantile estimator, sensitivity 1/2) and sets
C <- C exp(-eta_C (b~ - gamma)). The two noisy sums together are one Gaussian
mechanism with noise multiplier z, 1/z^2 = 1/z_Delta^2 + 1/(2 sigma_b)^2
(Andrew et al., Section 3), so the delta's noise multiplier is
z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (:func:`delta_noise_multiplier`)
and the accountant (:mod:`fedjax_sim.privacy`) sees z.

Every noise key is ``fold_in`` of the server key the round builder derives
from the round key (``seeding.round_subkeys``), so the noise is a function of
(seed, round) and a resumed run equals an uninterrupted one. Padding slots
(``ServerInfo.valid`` False, also the empty slots of a Poisson cohort) are
left out of the sums.

What the wrapper protects is the model (server state) sequence; the metrics
a simulation logs (training loss, ``server/dp_cohort``,
``server/dp_clipped_fraction``, ...) are computed from the clients' data
without noise and are not private.

Axis legend: K cohort (padded), P the parameters of one leaf.
"""
from __future__ import annotations

import zlib
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.protocol import (FederatedAlgorithm, LocalSpec, ServerInfo,
                                 client_update_from_local)

PyTree = Any
_NOISE_TAG = zlib.crc32(b"dp_noise") & 0x7FFFFFFF
_COUNT_TAG = zlib.crc32(b"dp_clipped_count") & 0x7FFFFFFF


class DPServerState(NamedTuple):
  """The server state of a DP-wrapped algorithm."""
  inner: PyTree  # the wrapped algorithm's server state
  clip_norm: jax.Array  # float32 []: C_t, the clipping norm of the next round


class DPUpload(NamedTuple):
  """What a client of a DP-wrapped algorithm uploads."""
  delta: PyTree  # the clipped model delta (the wrapped upload's pytree), norm <= C_t
  unclipped: jax.Array  # float32 []: b_i = 1 if ||Delta_i|| <= C_t else 0


def clip_by_norm(tree: PyTree, clip_norm: jax.Array) -> tuple[PyTree, jax.Array]:
  """``tree * min(1, C / ||tree||)`` and ||tree|| (the global L2 norm over every leaf).

  C = inf (or a zero tree) leaves ``tree`` unchanged bit for bit (the factor is exactly 1).

  Args:
    tree: one client's update (a pytree of float arrays).
    clip_norm: C > 0 (float32 []).

  Returns:
    (clipped tree, norm float32 []).
  """
  norm = optax.global_norm(tree)
  scale = jnp.minimum(1.0, clip_norm / norm)  # norm 0: C / 0 = inf -> 1
  return jax.tree.map(lambda x: x * scale.astype(x.dtype), tree), norm


def add_gaussian_noise(tree: PyTree, std: jax.Array, key: jax.Array) -> PyTree:
  """``tree + N(0, std^2)`` per coordinate; leaf i draws with ``split(key, leaves)[i]``."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noised = [x + std.astype(x.dtype) * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noised)


def delta_noise_multiplier(noise_multiplier: float, adaptive: bool,
                           clipped_count_stddev: float) -> float:
  """z_Delta, the delta's noise multiplier for a total (accounted) noise multiplier z.

  Without adaptive clipping z_Delta = z; with it, the clipped count's noise
  sigma_b takes its share: z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et
  al., arXiv 1905.03871, Section 3). z = 0 gives 0 (no noise).

  Raises:
    ValueError: adaptive clipping with 2 sigma_b <= z (the count would use the whole budget).
  """
  z = float(noise_multiplier)
  if not adaptive or z == 0.0:
    return z
  if 2.0 * clipped_count_stddev <= z:
    raise ValueError(f"dp.clipped_count_stddev={clipped_count_stddev} is too small for "
                     f"noise_multiplier={z}: adaptive clipping needs 2*sigma_b > z; raise "
                     "--config.dp.clipped_count_stddev (0 = expected cohort / 20).")
  return (z ** -2 - (2.0 * clipped_count_stddev) ** -2) ** -0.5


def private(algorithm: FederatedAlgorithm, *, noise_multiplier: float, clip_norm: float,
            expected_cohort: float, adaptive: bool = False, target_quantile: float = 0.5,
            clip_lr: float = 0.2, clipped_count_stddev: Optional[float] = None,
            name: Optional[str] = None) -> FederatedAlgorithm:
  """The client-level DP version of a delta-uploading algorithm (see the module docstring).

  Args:
    algorithm: a single-model algorithm whose upload is its model delta (the
      pytree the server averages, e.g. FedAvg's x_global - x_k) and whose
      server update takes the weighted mean of the uploads (FedAvg, FedProx,
      FedAdam, FedYogi, FedAdagrad). The caller vouches for this
      (``fedjax_sim.launch.experiment`` keeps the list).
    noise_multiplier: z >= 0: the noise on the clipped sum has std z_Delta C
      (:func:`delta_noise_multiplier`; z_Delta = z without adaptive clipping).
    clip_norm: C > 0 (may be inf: no clipping); with ``adaptive``, C_0.
    expected_cohort: m, the divisor of the noised sum: K (fixed-size cohort)
      or q*C (Poisson sampling), ``Sampler.expected_cohort``.
    adaptive: track the ``target_quantile`` of the update norms (Andrew et al.).
    target_quantile: gamma in (0, 1).
    clip_lr: eta_C >= 0, the geometric update's step.
    clipped_count_stddev: sigma_b >= 0 of the clipped count (default m / 20,
      Andrew et al., Section 4).
    name: the wrapped algorithm's name (default ``dp_<name>``).

  Returns:
    A FederatedAlgorithm: server state :class:`DPServerState`, upload
    :class:`DPUpload`, the same client state, ``eval_params`` and
    ``apply_fn``; with a ``local`` step form if the wrapped one has it. Client
    metrics add ``dp_update_norm`` (before clipping); server metrics add
    ``dp_clip_norm`` (C used this round), ``dp_cohort`` (clients that came)
    and ``dp_clipped_fraction``.

  Raises:
    ValueError: model pools or a client_query (not delta uploads), or a knob out of range.
  """
  if algorithm.pools or algorithm.client_query is not None:
    raise ValueError(f"algorithm '{algorithm.name}' has model pools or a second client phase; "
                     "client-level DP wraps single-model algorithms that upload a model delta.")
  if not noise_multiplier >= 0 or not clip_norm > 0 or not expected_cohort > 0:
    raise ValueError(f"DP needs noise_multiplier >= 0 (got {noise_multiplier}), clip_norm > 0 "
                     f"(got {clip_norm}) and expected_cohort > 0 (got {expected_cohort}); set "
                     "--config.dp.noise_multiplier, --config.dp.clip_norm.")
  if adaptive and not (0 < target_quantile < 1 and clip_lr >= 0):
    raise ValueError(f"adaptive clipping needs dp.target_quantile in (0, 1) (got "
                     f"{target_quantile}) and dp.clip_lr >= 0 (got {clip_lr}).")
  m = float(expected_cohort)
  sigma_b = m / 20.0 if clipped_count_stddev is None else float(clipped_count_stddev)
  if adaptive and sigma_b < 0:
    raise ValueError(f"dp.clipped_count_stddev={sigma_b} must be >= 0.")
  z_delta = delta_noise_multiplier(noise_multiplier, adaptive, sigma_b)

  def clipped(upload, client_state, metrics, clip):
    delta, norm = clip_by_norm(upload, clip)
    metrics = dict(metrics, dp_update_norm=norm)
    return DPUpload(delta, (norm <= clip).astype(jnp.float32)), client_state, metrics

  def client_update(bcast, client_state, data, rng, info):
    inner_bcast, clip = bcast
    upload, client_state, metrics = algorithm.client_update(inner_bcast, client_state, data,
                                                            rng, info)
    return clipped(upload, client_state, metrics, clip)

  local = None
  if algorithm.local is not None:
    spec = algorithm.local

    def begin(bcast, client_state, data, rng, info, *prepared):
      return spec.begin(bcast[0], client_state, data, rng, info, *prepared)

    prepare = None if spec.prepare is None else (
        lambda bcast, client_state, data, info: spec.prepare(bcast[0], client_state, data, info))

    def finish(bcast, client_state, aux, params, train_metrics, data, info):
      upload, client_state, metrics = spec.finish(bcast[0], client_state, aux, params,
                                                  train_metrics, data, info)
      return clipped(upload, client_state, metrics, bcast[1])

    local = spec._replace(begin=begin, finish=finish, prepare=prepare)
    client_update = client_update_from_local(local)

  def init(rng):
    return DPServerState(algorithm.init(rng), jnp.float32(clip_norm))

  def server_update(state, uploads, weights, info, rng):
    del weights  # uniform weighting (DP-FedAvg): each client's clipped delta counts once
    came = info.valid.astype(jnp.float32)  # [K]; 0 for padding and empty Poisson slots
    clip = state.clip_norm
    total = jax.tree.map(lambda x: jnp.tensordot(came.astype(x.dtype), x, axes=1), uploads.delta)
    if z_delta > 0:
      total = add_gaussian_noise(total, z_delta * clip, jax.random.fold_in(rng, _NOISE_TAG))
    # The barriers keep XLA from folding the constants m and weight 1 into the arithmetic
    # around them (it rewrites a division by a constant as a multiplication by the rounded
    # reciprocal, differently inside lax.scan): z = 0, C = inf then equals the inner
    # algorithm with uniform weights bit for bit (tested).
    denom, one_weight = jax.lax.optimization_barrier((jnp.float32(m), jnp.ones((1,), jnp.float32)))
    mean = jax.tree.map(lambda x: x / denom.astype(x.dtype), total)
    one = ServerInfo(info.round, info.client_ids[:1], jnp.sum(info.num_examples)[None],
                     jnp.ones((1,), bool))
    inner, metrics = algorithm.server_update(state.inner, jax.tree.map(lambda x: x[None], mean),
                                             one_weight, one, rng)
    cohort = jnp.sum(came)
    metrics = dict(metrics, dp_clip_norm=clip, dp_cohort=cohort,
                   dp_clipped_fraction=jnp.sum(came * (1.0 - uploads.unclipped))
                   / jnp.maximum(cohort, 1.0))
    if adaptive:
      below = jnp.sum(came * (uploads.unclipped - 0.5))
      if sigma_b > 0:
        below = below + sigma_b * jax.random.normal(jax.random.fold_in(rng, _COUNT_TAG))
      frac = below / m + 0.5
      clip = clip * jnp.exp(-clip_lr * (frac - target_quantile))
      metrics["dp_unclipped_estimate"] = frac
    return DPServerState(inner, clip.astype(jnp.float32)), metrics

  return algorithm._replace(
      name=name or f"dp_{algorithm.name}", init=init, client_update=client_update,
      server_update=server_update, broadcast=lambda s: (algorithm.broadcast(s.inner),
                                                        s.clip_norm),
      eval_params=lambda s, c: algorithm.eval_params(s.inner, c), local=local,
      evaluate=None if algorithm.evaluate is None else (
          lambda s, c, d: algorithm.evaluate(s.inner, c, d)))

