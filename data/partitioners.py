"""Partitioners: assign every training example to exactly one client.

All partitioners are pure functions of (labels, num_clients, seed) and their
knobs: the same seed gives the same partition, and every example index appears
exactly once across clients. Names follow the literature: IID, Dirichlet label
skew Dir(alpha) ("PRA" in FedRE, Hsu et al. arXiv 1909.06335), pathological
shards with k classes per client ("PAT", McMahan et al. arXiv 1602.05629),
quantity skew.

Each is registered by name (:func:`fedjax_sim.data.register_partitioner`):
``cfg.data.partition`` picks one, and its keyword parameters are its knobs,
read from ``cfg.data`` by name (``alpha``, ``classes_per_client``,
``min_examples``, ...); each checks its own knobs. A new partitioner is one
decorated function (``examples/custom_partition.py``).

``seed`` is anything ``np.random.default_rng`` takes: an int, or (as the data
pipeline passes) the run's ``np.random.SeedSequence`` for this purpose
(``fedjax_sim.seeding.numpy_seed(run_seed, "partition")`` / ``"split"``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import numpy as np

from fedjax_sim.data.registry import (PARTITIONERS, PartitionError, bind, get_partitioner,
                                      register_partitioner)

Seed = Union[int, np.random.SeedSequence]

__all__ = ["PARTITIONERS", "PartitionError", "dirichlet", "from_config", "iid", "partition",
           "pathological", "quantity_skew", "register_partitioner", "train_test_split_clients"]


def _check_common(labels: np.ndarray, num_clients: int) -> None:
  if num_clients < 1:
    raise PartitionError(f"num_clients={num_clients} must be >= 1; set --config.data.num_clients.")
  if num_clients > len(labels):
    raise PartitionError(
        f"num_clients={num_clients} exceeds the {len(labels)} training examples, so some client "
        "would have no data; lower --config.data.num_clients.")


@register_partitioner("iid")
def iid(labels: np.ndarray, num_clients: int, seed: Seed) -> list[np.ndarray]:
  """Shuffles and deals examples into near-equal client shards."""
  _check_common(labels, num_clients)
  perm = np.random.default_rng(seed).permutation(len(labels))
  return [np.sort(s) for s in np.array_split(perm, num_clients)]


@register_partitioner("dirichlet", aliases=("pra",))
def dirichlet(labels: np.ndarray, num_clients: int, seed: Seed, *, alpha: float = 0.5,
              min_examples: int = 2, max_tries: int = 1000) -> list[np.ndarray]:
  """Dirichlet label skew: class c's examples are split by p_c ~ Dir(alpha * 1_C).

  Resamples (up to ``max_tries``) until every client has >= ``min_examples``.
  Smaller alpha = more skew; alpha -> inf approaches IID.

  Raises:
    PartitionError: alpha <= 0, or no draw gave every client min_examples.
  """
  _check_alpha(alpha, "Dirichlet concentration; smaller = more label skew, e.g. 0.1 or 0.5")
  _check_min_examples(min_examples)
  _check_common(labels, num_clients)
  if min_examples * num_clients > len(labels):
    raise PartitionError(
        f"min_examples={min_examples} x num_clients={num_clients} exceeds {len(labels)} examples; "
        "lower --config.data.num_clients or --config.data.min_examples.")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  by_class = [np.flatnonzero(labels == c) for c in classes]
  for _ in range(max_tries):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx in by_class:
      idx = rng.permutation(idx)
      p = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
      for k, chunk in enumerate(np.split(idx, cuts)):
        parts[k].append(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    if min(len(o) for o in out) >= min_examples:
      return out
  raise PartitionError(
      f"Dir(alpha={alpha}) over {num_clients} clients left some client with fewer than "
      f"{min_examples} examples in {max_tries} draws; raise --config.data.alpha, lower "
      "--config.data.num_clients, or lower --config.data.min_examples.")


@register_partitioner("pathological", aliases=("pat",))
def pathological(labels: np.ndarray, num_clients: int, seed: Seed, *,
                 classes_per_client: int = 2) -> list[np.ndarray]:
  """Shards ("PAT"): sort by label, cut into num_clients * k shards, deal k each.

  Each client sees at most ``classes_per_client`` labels (exactly k unless a
  shard straddles a class boundary).
  """
  if classes_per_client < 1:
    raise PartitionError(f"classes_per_client={classes_per_client} must be >= 1; set "
                         "--config.data.classes_per_client.")
  num_classes = len(np.unique(labels))
  if classes_per_client > num_classes:
    raise PartitionError(
        f"classes_per_client={classes_per_client} exceeds the dataset's {num_classes} classes; "
        f"set --config.data.classes_per_client to at most {num_classes}.")
  _check_common(labels, num_clients)
  num_shards = num_clients * classes_per_client
  if num_shards > len(labels):
    raise PartitionError(
        f"{num_clients} clients x {classes_per_client} classes = {num_shards} shards exceeds "
        f"{len(labels)} examples; lower --config.data.num_clients or "
        "--config.data.classes_per_client.")
  rng = np.random.default_rng(seed)
  # Stable sort by label with a random tie order, so shards differ by seed.
  order = np.lexsort((rng.random(len(labels)), labels))
  shards = np.array_split(order, num_shards)
  shard_ids = rng.permutation(num_shards).reshape(num_clients, classes_per_client)
  return [np.sort(np.concatenate([shards[s] for s in row])) for row in shard_ids]


@register_partitioner("quantity_skew")
def quantity_skew(labels: np.ndarray, num_clients: int, seed: Seed, *, alpha: float = 0.5,
                  min_examples: int = 2) -> list[np.ndarray]:
  """Quantity skew: IID labels, client sizes proportional to q ~ Dir(alpha).

  Each client first gets ``min_examples``, the rest is split by q.

  Raises:
    PartitionError: alpha <= 0, min_examples < 0, or too few examples.
  """
  _check_alpha(alpha, "quantity-skew concentration; smaller = more unequal client sizes")
  _check_min_examples(min_examples)
  _check_common(labels, num_clients)
  n = len(labels)
  if min_examples * num_clients > n:
    raise PartitionError(
        f"min_examples={min_examples} x num_clients={num_clients} exceeds {n} examples; lower "
        "--config.data.num_clients or --config.data.min_examples.")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(n)
  q = rng.dirichlet(np.full(num_clients, alpha))
  rest = n - min_examples * num_clients
  extra = np.floor(q * rest).astype(int)
  extra[: rest - extra.sum()] += 1  # hand out the rounding remainder
  sizes = extra + min_examples
  cuts = np.cumsum(sizes)[:-1]
  return [np.sort(s) for s in np.split(perm, cuts)]


def partition(labels: np.ndarray, num_clients: int, method: str, seed: Seed,
              **knobs: Any) -> list[np.ndarray]:
  """Partitions by registered name (``pra`` and ``pat`` are FedRE's aliases).

  Args:
    labels: int [N] labels of the examples to partition.
    num_clients: C.
    method: a :data:`PARTITIONERS` name or alias.
    seed: the partition seed (an int or a ``np.random.SeedSequence``).
    knobs: settings; the partitioner takes the ones it declares (its keyword
      parameters) and ignores the rest (a whole data config goes through
      :func:`from_config`).

  Returns:
    A list of num_clients sorted int64 index arrays into ``labels``; their
    union is every index exactly once.

  Raises:
    PartitionError: unknown method, or the partitioner's own check failed.
  """
  _, fn = get_partitioner(method)
  return fn(np.asarray(labels), num_clients, seed, **bind(fn, knobs, skip=3))


def from_config(knobs: Mapping[str, Any]) -> Callable[..., list[np.ndarray]]:
  """``partitioner(labels, num_clients, seed) -> parts``: the data config's partitioner.

  Args:
    knobs: the data config's entries: ``partition`` (default ``dirichlet``)
      names the partitioner, which takes the knobs it declares.

  The name is looked up when the partitioner is called (a dataset that defines
  its own clients never calls it), so an unknown name raises
  :class:`PartitionError` then.
  """
  def partitioner(labels, num_clients, seed):
    _, fn = get_partitioner(knobs.get("partition", "dirichlet"))
    return fn(np.asarray(labels), num_clients, seed, **bind(fn, knobs, skip=3))
  return partitioner


def _check_alpha(alpha: Any, meaning: str) -> None:
  if not alpha > 0:
    raise PartitionError(f"data.alpha={alpha} must be > 0 ({meaning}); set --config.data.alpha.")


def _check_min_examples(min_examples: Any) -> None:
  if min_examples < 0:
    raise PartitionError(f"data.min_examples={min_examples} must be >= 0; set "
                         "--config.data.min_examples.")


def train_test_split_clients(parts: list[np.ndarray], test_fraction: float,
                             seed: Seed) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Splits each client's indices into its own train and test parts.

  Every client with >= 2 examples keeps >= 1 train and >= 1 test example, so
  per-client accuracy (fairness metrics) is defined for everyone.

  Raises:
    PartitionError: test_fraction outside [0, 1), or a client with no data.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise PartitionError(
        f"client_test_fraction={test_fraction} must be in [0, 1); set "
        "--config.data.client_test_fraction.")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for k, idx in enumerate(parts):
    if len(idx) == 0:
      raise PartitionError(
          f"client {k} has no data; use a partition with min_examples >= 1 or fewer clients.")
    idx = rng.permutation(idx)
    n_test = int(round(test_fraction * len(idx)))
    if test_fraction > 0 and len(idx) >= 2:
      n_test = min(max(n_test, 1), len(idx) - 1)
    else:
      n_test = 0
    test.append(np.sort(idx[:n_test]))
    train.append(np.sort(idx[n_test:]))
  return train, test
