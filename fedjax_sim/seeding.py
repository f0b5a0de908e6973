"""Independent random streams derived from one run seed.

Every source of randomness in a simulation has its own named stream, so no two
of them ever share bits (before, the server's init key equalled round 0's round
key, and run seed s split train/test with seed s + 1, which is run s + 1's
partition seed):

* JAX streams (:func:`jax_key`): ``fold_in(PRNGKey(seed), tag)`` with a fixed
  32-bit tag per stream name (CRC-32 of the name). ``init`` is the server's
  init key, ``client_init`` is folded with the client id, ``rounds`` is folded
  with the round number (:func:`round_key`). The seed may be a traced int32
  (vectorized sweeps trace it).
* NumPy streams (:func:`numpy_seed`): child ``i`` of
  ``np.random.SeedSequence(seed).spawn(len(NUMPY_STREAMS))``, ``i`` the
  stream's index in :data:`NUMPY_STREAMS`; pass it to
  ``np.random.default_rng``. New streams are appended, so existing ones keep
  their bits.

Within a round, ``split(round_key, 3)`` gives the cohort-sampling, client and
server keys; a client's key is ``fold_in(client_key, client_id)``.
"""
from __future__ import annotations

import zlib
from typing import Union

import jax
import numpy as np

# The JAX streams of a run.
JAX_STREAMS = ("init", "client_init", "rounds")

# The NumPy (host) streams of a run; append only (the index is the spawn key).
NUMPY_STREAMS = (
    "partition",  # client partition of the training pool (data/partitioners.py)
    "split",  # per-client train/test split
    "availability",  # per-client availabilities (sampling.availability_probs)
    "schedule",  # a fixed participation schedule drawn from the availabilities
    "dataset",  # a generated dataset (LEAF Synthetic)
    "server_data",  # a server-held split (CODIST's distillation set, FedMuscle's public set)
    "pools",  # membership of model pools (CODIST's high-capacity clients)
)


def _tag(stream: str) -> int:
  return zlib.crc32(stream.encode()) & 0x7FFFFFFF


def jax_key(seed: Union[int, jax.Array], stream: str) -> jax.Array:
  """The root key of a named JAX stream (uint32 [2]).

  Args:
    seed: the run seed (Python int or traced int32 scalar, >= 0).
    stream: one of :data:`JAX_STREAMS`.

  Raises:
    ValueError: unknown stream name.
  """
  if stream not in JAX_STREAMS:
    raise ValueError(f"unknown JAX stream '{stream}'; one of {', '.join(JAX_STREAMS)}.")
  return jax.random.fold_in(jax.random.PRNGKey(seed), _tag(stream))


def round_key(seed: Union[int, jax.Array], round_: Union[int, jax.Array]) -> jax.Array:
  """Round ``round_``'s key: ``fold_in(jax_key(seed, "rounds"), round_)``."""
  return jax.random.fold_in(jax_key(seed, "rounds"), round_)


def round_subkeys(seed: Union[int, jax.Array],
                  round_: Union[int, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(k_sample, k_clients, k_server)`` of a round, as the round builder uses them.

  Client i's key is ``fold_in(k_clients, i)``; a model pool samples its cohort
  with ``fold_in(k_sample, crc32(pool name))``.
  """
  k_sample, k_clients, k_server = jax.random.split(round_key(seed, round_), 3)
  return k_sample, k_clients, k_server


def pool_sample_key(k_sample: jax.Array, name: str) -> jax.Array:
  """A model pool's cohort key: ``fold_in(k_sample, crc32(name) & 0x7FFFFFFF)`` (uint32 [2]).

  It depends on the pool's name, not its position, so a pool samples the same
  clients whatever other pools run beside it.
  """
  return jax.random.fold_in(k_sample, _tag(name))


def numpy_seed(seed: int, stream: str) -> np.random.SeedSequence:
  """The SeedSequence of a named NumPy stream (``np.random.default_rng`` takes it).

  Equals ``np.random.SeedSequence(seed).spawn(len(NUMPY_STREAMS))[i]`` with
  ``i = NUMPY_STREAMS.index(stream)``.

  Raises:
    ValueError: a negative seed, or an unknown stream name.
  """
  if stream not in NUMPY_STREAMS:
    raise ValueError(f"unknown NumPy stream '{stream}'; one of {', '.join(NUMPY_STREAMS)}.")
  seed = int(seed)
  if seed < 0:
    raise ValueError(f"seed={seed} must be >= 0.")
  return np.random.SeedSequence(seed, spawn_key=(NUMPY_STREAMS.index(stream),))


def numpy_rng(seed: int, stream: str) -> np.random.Generator:
  """``np.random.default_rng(numpy_seed(seed, stream))``."""
  return np.random.default_rng(numpy_seed(seed, stream))
