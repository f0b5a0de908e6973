"""The padded, device-resident client dataset pytree."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class ClientData(NamedTuple):
  """Every client's examples, padded to a common length N.

  Attributes:
    x: float32 [C, N, *input_shape]; padded rows are zeros.
    y: int32 [C, N]; padded rows are 0.
    mask: bool [C, N]; True for real examples. Real rows come first.
    num_examples: int32 [C]; number of real rows per client (= mask.sum(1)).

  Inside a client update the leading C axis is gone (one client's slice).
  """
  x: jax.Array
  y: jax.Array
  mask: jax.Array
  num_examples: jax.Array

  @property
  def num_clients(self) -> int:
    return self.y.shape[0]

  @property
  def max_examples(self) -> int:
    return self.y.shape[-1]


def pack(xs: list[np.ndarray], ys: list[np.ndarray], multiple: int = 1) -> ClientData:
  """Packs per-client arrays into a padded :class:`ClientData` (NumPy, host).

  Args:
    xs: C arrays float32 [n_k, *input_shape].
    ys: C arrays int [n_k].
    multiple: N is rounded up to a multiple of this (the batch size), so a
      batch slice never runs past the end.
  """
  if len(xs) != len(ys) or not xs:
    raise ValueError(f"pack needs equally many x and y arrays (got {len(xs)}, {len(ys)}).")
  sizes = np.array([len(y) for y in ys], dtype=np.int32)
  n = max(int(sizes.max()), 1)
  n = -(-n // multiple) * multiple
  shape = xs[0].shape[1:]
  x = np.zeros((len(xs), n, *shape), np.float32)
  y = np.zeros((len(xs), n), np.int32)
  mask = np.zeros((len(xs), n), bool)
  for k, (xk, yk) in enumerate(zip(xs, ys)):
    x[k, : len(yk)] = xk
    y[k, : len(yk)] = yk
    mask[k, : len(yk)] = True
  return ClientData(x, y, mask, sizes)


def pad_examples(data: ClientData, n: int) -> ClientData:
  """Pads every client's example axis to N = n rows (mask False, so inert).

  Used to give datasets of different partitions (seeds) one shape, so they
  share one compiled round. Goes through host memory.

  Raises:
    ValueError: n is smaller than the current N.
  """
  extra = n - data.y.shape[1]
  if extra < 0:
    raise ValueError(f"cannot pad N={data.y.shape[1]} rows down to {n}.")
  if extra == 0:
    return data
  pad = lambda a: jnp.asarray(np.pad(np.asarray(a), [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2)))
  return ClientData(pad(data.x), pad(data.y), pad(data.mask), data.num_examples)


def to_device(data: ClientData, sharding=None) -> ClientData:
  """Puts the whole client dataset on device once (replicated by default)."""
  return jax.tree.map(lambda a: jax.device_put(np.asarray(a), sharding), data)
