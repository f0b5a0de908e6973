"""The device-resident client dataset: padded [C, N, ...] or flat [T, ...] storage.

Two storages hold the same clients:

* :class:`ClientData` (padded): every client padded to the largest client's N, so memory is
  C x N_max rows. Simple, and what every algorithm sees for ONE client ([N, ...]).
* :class:`FlatClientData` (flat): all clients' rows in one [T, ...] array (T = total
  examples) plus per-client ``offsets`` and ``num_examples``, so memory follows the examples.
  Natural partitions with heavy-tailed sizes (FEMNIST writers, StackOverflow users) need it.

The engine reads client data only through :func:`gather_clients` (a cohort or chunk [K, N, ...])
and :func:`batch_rows` (one step's batch), which accept either storage, so the algorithms see
the same padded per-client :class:`ClientData` under both and a run is bit-identical under
both (``tests/test_client_data.py``).

Axis legend: C clients, K cohort, N examples per client (padded), T total examples, B batch.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import flax.struct
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
    """N, the padded examples per client (labels may be [C, N] or sequences [C, N, T])."""
    return self.mask.shape[-1]


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


def pad_clients(data: ClientData, multiple: int) -> ClientData:
  """Appends empty clients (0 examples) so that C is a multiple of ``multiple`` (host).

  For ``make_round(shard_data=True)``, whose data is split along C over the devices. The
  empty clients are never sampled: samplers draw from the real C they were built with.
  """
  c = data.num_clients
  extra = -c % multiple
  if extra == 0:
    return data
  pad = lambda a: np.concatenate([np.asarray(a), np.zeros((extra,) + a.shape[1:], a.dtype)])
  return ClientData(pad(data.x), pad(data.y), pad(data.mask), pad(data.num_examples))


def to_device(data: AnyClientData, sharding=None) -> AnyClientData:
  """Puts the whole client dataset on device once (replicated by default); either storage."""
  return jax.tree.map(lambda a: jax.device_put(np.asarray(a), sharding), data)


@flax.struct.dataclass
class FlatClientData:
  """Every client's examples stored flat: memory follows the examples, not C x N_max.

  Attributes:
    x: float32 [T + N, *input_shape]: client c's rows are ``x[offsets[c] : offsets[c] +
      num_examples[c]]``; the last N rows are zeros (a client's N-row window never runs past
      the end).
    y: int32 [T + N].
    offsets: int32 [C]: first row of each client.
    num_examples: int32 [C]: real rows per client.
    max_examples: N (static), the per-client window: the largest client rounded up to the
      batch-size multiple, as :class:`ClientData`'s N.

  A client's view (:func:`gather_clients`) is the padded :class:`ClientData` row it would
  have under padded storage: its rows, then zeros with ``mask`` False.
  """
  x: jax.Array
  y: jax.Array
  offsets: jax.Array
  num_examples: jax.Array
  max_examples: int = flax.struct.field(pytree_node=False, default=1)

  @property
  def num_clients(self) -> int:
    return self.num_examples.shape[0]

  @property
  def total_examples(self) -> int:
    """T, the real rows stored (host value)."""
    return int(np.sum(np.asarray(self.num_examples)))


AnyClientData = Union[ClientData, FlatClientData]


def flatten(data: ClientData) -> FlatClientData:
  """The flat storage of a padded :class:`ClientData` (host, NumPy)."""
  n = np.asarray(data.num_examples, np.int32)
  mask = np.asarray(data.mask)
  x, y = np.asarray(data.x), np.asarray(data.y)
  return _flat_from_rows(x[mask], y[mask], n, data.max_examples)


def _flat_from_rows(x: np.ndarray, y: np.ndarray, sizes: np.ndarray, n_max: int
                    ) -> FlatClientData:
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  xd = x.dtype if np.issubdtype(x.dtype, np.integer) else np.float32  # token ids stay ints
  tail = np.zeros((n_max, *x.shape[1:]), xd)
  return FlatClientData(np.concatenate([x.astype(xd), tail]),
                        np.concatenate([y.astype(np.int32),
                                        np.zeros((n_max,) + y.shape[1:], np.int32)]),
                        offsets, sizes.astype(np.int32), int(n_max))


def pack_flat(xs: list[np.ndarray], ys: list[np.ndarray], multiple: int = 1) -> FlatClientData:
  """Packs per-client arrays into :class:`FlatClientData` (NumPy, host), never C x N_max.

  Args:
    xs: C arrays float32 [n_k, *input_shape].
    ys: C arrays int [n_k].
    multiple: N (the per-client window) is rounded up to a multiple of this (the batch size).

  Raises:
    ValueError: no clients, or unequal numbers of x and y arrays.
  """
  if len(xs) != len(ys) or not xs:
    raise ValueError(f"pack_flat needs equally many x and y arrays (got {len(xs)}, {len(ys)}).")
  sizes = np.array([len(y) for y in ys], dtype=np.int32)
  n = -(-max(int(sizes.max()), 1) // multiple) * multiple
  shape = xs[0].shape[1:]
  x = np.concatenate([np.asarray(a).reshape(-1, *shape) for a in xs])
  y = np.concatenate([np.asarray(b).reshape(len(b), *np.asarray(b).shape[1:]) for b in ys])
  return _flat_from_rows(x, y, sizes, n)


def unflatten(data: FlatClientData) -> ClientData:
  """The padded :class:`ClientData` of a flat storage (host; C x N memory)."""
  out = gather_clients(data, jnp.arange(data.num_clients, dtype=jnp.int32))
  return jax.tree.map(np.asarray, out)


def gather_clients(data: AnyClientData, ids: jax.Array) -> ClientData:
  """The padded views of clients ``ids``: ClientData [K, N, ...] (either storage).

  Args:
    data: padded or flat client data.
    ids: int32 [K] client ids (or a scalar: one client's [N, ...] view).
  """
  if isinstance(data, ClientData):
    return jax.tree.map(lambda a: a[ids], data)
  n_max = data.max_examples
  data = jax.tree.map(jnp.asarray, data)  # host NumPy storage: index it with traced ids

  def one(gid):
    off, n = data.offsets[gid], data.num_examples[gid]
    mask = jnp.arange(n_max) < n
    rows = lambda a: jnp.where(mask.reshape((n_max,) + (1,) * (a.ndim - 1)), a,
                               jnp.zeros((), a.dtype))
    x = rows(jax.lax.dynamic_slice_in_dim(data.x, off, n_max))
    y = rows(jax.lax.dynamic_slice_in_dim(data.y, off, n_max))
    return ClientData(x, y, mask, n)

  ids = jnp.asarray(ids)
  return one(ids) if ids.ndim == 0 else jax.vmap(one)(ids)


def batch_rows(data: AnyClientData, gid: jax.Array, idx: jax.Array, bmask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """One step's batch of client ``gid`` read straight from storage: (x [B, ...], y [B]).

  ``idx`` int32 [B] are row positions inside the client (from
  :func:`fedjax_sim.protocol.local_batch`); rows with ``bmask`` False are zeros, as the
  padded storage's padding rows are, so both storages give the same batch.
  """
  if isinstance(data, ClientData):
    return data.x[gid, idx], data.y[gid, idx]
  rows = data.offsets[gid] + idx
  keep = lambda a: jnp.where(bmask.reshape(bmask.shape + (1,) * (a.ndim - 1)), a,
                             jnp.zeros((), a.dtype))
  return keep(data.x[rows]), keep(data.y[rows])


def stored_bytes(data: AnyClientData) -> int:
  """Bytes of the stored arrays (x, y, and mask / offsets, num_examples)."""
  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(data)))
