"""Unlabeled server sets that no client may train on (CODIST's distillation data, arXiv 2310.02549).

Two ways, both drawing the server examples per class, evenly, from the NumPy
stream ``server_data`` of a server seed (:mod:`fedjax_sim.seeding`):

* :func:`server_holdout`: the data pipeline's (``--config.data.server_size``):
  the server set is carved out of the clients' TRAINING rows after the
  partition; the rows stay in the client arrays and a keep mask hides them
  (``aux["client_keep"]``, ``aux["server_x"]``; CODIST masks them out of local
  training and the aggregation weights). The partition is the plain pipeline's.
* :func:`build_codist_data`: the CODIST report's (``launch/experiments/codist_digits.py``):
  the server sets are removed from the source's train split BEFORE the
  partition, optionally with a class-based domain split of the clients and an
  out-of-domain server set.

Axis legend: C clients, N examples per client, N_s server examples.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import numpy as np

from fedjax_sim import seeding
from fedjax_sim.client_data import pack, to_device
from fedjax_sim.data import partitioners as part_lib
from fedjax_sim.data import sources
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.registry import DatasetError

__all__ = ["CodistData", "build_codist_data", "server_holdout", "take_per_class"]


def take_per_class(labels: np.ndarray, classes: Sequence[int], size: int,
                   rng: np.random.Generator) -> np.ndarray:
  """``size`` indices into ``labels`` with labels in ``classes``, split as evenly as possible
  by class (the first of a random permutation of each class); int64, sorted."""
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  share = np.array_split(np.arange(size), len(classes))
  return np.sort(np.concatenate([p[: len(s)] for p, s in zip(pools, share)])).astype(np.int64)


def server_holdout(train_idx: Sequence[np.ndarray], labels: np.ndarray, x: np.ndarray,
                   server_size: int, server_seed: int,
                   padded_n: int) -> tuple[np.ndarray, np.ndarray]:
  """A server set carved out of the clients' training rows, and the mask that hides it.

  Candidates are every client's training rows except its first (so every client
  keeps >= 1 example); ``server_size`` of them are drawn per class, evenly
  (:func:`take_per_class` with ``seeding.numpy_rng(server_seed, "server_data")``).
  The clients' own test rows and the global test set are untouched.

  Args:
    train_idx: C int arrays: client k's training rows, indices into ``labels``/``x``
      in the order the client arrays are packed.
    labels: int [N_all].  x: float32 [N_all, ...].
    server_size: N_s >= 1.
    server_seed: seed of the ``server_data`` stream.
    padded_n: N, the packed client arrays' length.

  Returns:
    ``(keep bool [C, N], server_x float32 [N_s, ...])``.

  Raises:
    DatasetError: server_size < 1 or more than the candidate rows.
  """
  cand = np.concatenate([t[1:] for t in train_idx])
  if not 1 <= server_size <= len(cand):
    raise DatasetError(
        f"data.server_size={server_size} must be in [1, {len(cand)}] (the clients' training rows "
        "that can be held out, one kept per client); set --config.data.server_size (0 = no "
        "server set).")
  labels = np.asarray(labels)
  rng = seeding.numpy_rng(server_seed, "server_data")
  chosen = take_per_class(labels[cand], np.unique(labels[cand]), server_size, rng)
  server = np.zeros(len(labels), bool)
  server[cand[chosen]] = True
  keep = np.zeros((len(train_idx), padded_n), bool)
  for k, t in enumerate(train_idx):
    keep[k, : len(t)] = ~server[t]
  return keep, np.asarray(x[server], np.float32)


class CodistData(NamedTuple):
  """Client data plus held-out server sets (see :func:`build_codist_data`).

  Attributes:
    fed: FederatedData: train/test ClientData [C, N, ...] (no server example
      in either), the global test set (the source's test split).
    server_sets: name -> float32 [N_s, ...] unlabeled server data: ``in``
      (classes clients hold) and, when ``ood_classes`` is set, ``ood``.
    server_idx: name -> int [N_s] indices into the source's TRAIN split.
    large_ids: int32 [C_large] global ids of high-capacity clients.
    small_ids: int32 [C_small] ids of the small pool (all clients, or the
      complement of large_ids under domain shift).
  """
  fed: Any
  server_sets: dict
  server_idx: dict
  large_ids: np.ndarray
  small_ids: np.ndarray


def build_codist_data(*, dataset: str = "digits", num_clients: int = 50,
                      large_fraction: float = 0.3, server_size: int = 250,
                      partition: str = "dirichlet", alpha: float = 0.5,
                      domain_classes: Optional[tuple] = None,
                      ood_classes: Optional[Sequence[int]] = None, client_test_fraction=0.2,
                      batch_size: int = 10, seed: int = 0, server_seed: int = 0,
                      data_dir: Optional[str] = None) -> CodistData:
  """Clients' data and held-out unlabeled server sets, from the source's train split.

  The server sets are drawn (per class, evenly; NumPy stream ``server_data`` of
  ``server_seed``, see :mod:`fedjax_sim.seeding`)
  from the source's TRAIN split, and those examples are removed before the
  clients' partition, so no client ever holds one. The global test set (the
  source's test split) is untouched. For digits: train = 1,347 examples
  (``sources.load_digits``' stratified 75% split), test = 450.

  Without domain shift: ``server_size`` examples of all classes form ``in``;
  the rest is split over C clients by ``partition``; the first
  ``round(large_fraction * C)`` clients are high-capacity (a random subset,
  since the partition is a random draw per seed).

  With ``domain_classes = (large_classes, small_classes)``: the first
  ``round(large_fraction * C)`` clients hold only ``large_classes``, the
  others only ``small_classes`` (each group split by ``partition`` among its
  clients); the small pool is then those other clients (disjoint pools).
  ``ood_classes`` (e.g. (8, 9)) are held by NO client: ``ood`` is
  ``server_size`` examples of them (out-of-domain distillation data), and the
  ``in`` set is drawn from the clients' classes.

  Raises:
    ValueError: overlapping class groups or too few examples.
  """
  ds = sources.load(dataset, data_dir)
  labels = np.asarray(ds.train_y)
  all_classes = list(range(ds.num_classes))
  ood = list(ood_classes or [])
  if domain_classes is not None:
    groups = [list(g) for g in domain_classes]
    flat = groups[0] + groups[1] + ood
    if len(set(flat)) != len(flat):
      raise ValueError(f"domain classes {domain_classes} and ood_classes {ood} overlap.")
  client_classes = [c for c in all_classes if c not in ood] if domain_classes is None else (
      groups[0] + groups[1])
  rng = seeding.numpy_rng(server_seed, "server_data")
  server_idx = {"in": take_per_class(labels, client_classes, server_size, rng)}
  if ood:
    server_idx["ood"] = take_per_class(labels, ood, server_size, rng)
  held = np.zeros(len(labels), bool)
  for idx in server_idx.values():
    held[idx] = True
  avail = np.flatnonzero(~held & np.isin(labels, client_classes))

  n_large = int(round(large_fraction * num_clients))
  if not 1 <= n_large <= num_clients:
    raise ValueError(f"large_fraction={large_fraction} of {num_clients} clients gives {n_large} "
                     "high-capacity clients; need at least 1.")
  split = lambda idx, n, s: [idx[p] for p in part_lib.partition(
      labels[idx], n, partition, s, alpha=alpha, min_examples=2)]
  part_seed = seeding.numpy_seed(seed, "partition")
  if domain_classes is None:
    parts = split(avail, num_clients, part_seed)
    # Client k's data are a random draw of the seed's partition, so the first
    # n_large clients are a random subset; fixed ids let seeds share a program.
    large_ids, small_ids = np.arange(n_large), np.arange(num_clients)
  else:
    if n_large == num_clients:
      raise ValueError("domain shift needs clients in both groups; lower large_fraction.")
    a = avail[np.isin(labels[avail], groups[0])]
    b = avail[np.isin(labels[avail], groups[1])]
    seed_a, seed_b = part_seed.spawn(2)  # one partition stream per class group
    parts = split(a, n_large, seed_a) + split(b, num_clients - n_large, seed_b)
    large_ids, small_ids = np.arange(n_large), np.arange(n_large, num_clients)
  tr, te = part_lib.train_test_split_clients(parts, client_test_fraction,
                                             seeding.numpy_seed(seed, "split"))
  train = pack([ds.train_x[i] for i in tr], [labels[i] for i in tr], batch_size)
  test = pack([ds.train_x[i] for i in te], [labels[i] for i in te])
  fed = FederatedData(to_device(train), to_device(test), jax.device_put(ds.test_x),
                      jax.device_put(ds.test_y), ds.num_classes, tuple(ds.input_shape), ds.name)
  return CodistData(fed, {k: np.asarray(ds.train_x[v], np.float32) for k, v in server_idx.items()},
                    server_idx, large_ids.astype(np.int32), small_ids.astype(np.int32))
