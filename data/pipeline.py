"""From a data config to device-resident federated train/test arrays.

:func:`build_federated_data` looks up ``cfg.data.dataset`` in
:data:`fedjax_sim.data.DATASETS` and calls it with the knobs it declares. A
centralized :class:`~fedjax_sim.data.Dataset` is then partitioned over the
clients by the partitioner ``cfg.data.partition``
(:data:`fedjax_sim.data.PARTITIONERS`, with the knobs it declares), each
client's examples split into its own train and test parts, and packed; a
dataset that defines its clients returns a finished
:class:`~fedjax_sim.data.FederatedData`. Auxiliary sets (``FederatedData.aux``)
come from the dataset, or from the pipeline: ``cfg.data.server_size > 0`` holds
an unlabeled server set out of the clients' training rows
(:func:`fedjax_sim.data.server_sets.server_holdout`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from fedjax_sim import seeding
from fedjax_sim.client_data import FlatClientData, flatten
from fedjax_sim.data import partitioners as part_lib
from fedjax_sim.data import server_sets, sources
from fedjax_sim.data.federated import FederatedData, on_device, pack_clients
from fedjax_sim.data.registry import DatasetError, bind, get_dataset, register_dataset

__all__ = ["FederatedData", "build_federated_data", "config_items"]


def config_items(cfg: Any) -> dict[str, Any]:
  """``{key: value}`` of a data config: a ConfigDict, a dict or an object with attributes."""
  if cfg is None:
    return {}
  if isinstance(cfg, Mapping) or hasattr(cfg, "items"):
    return dict(cfg.items())
  return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def build_federated_data(cfg: Any, batch_size: int = 1, seed: int = 0,
                         sharding: Any = None) -> FederatedData:
  """Loads, partitions, splits and packs the dataset described by ``cfg``.

  Args:
    cfg: the data config (a ConfigDict, a dict, or anything with attributes):
      ``dataset`` (a :data:`~fedjax_sim.data.DATASETS` name, default
      ``digits``), ``partition`` (a :data:`~fedjax_sim.data.PARTITIONERS`
      name, default ``dirichlet``), ``num_clients``, ``client_test_fraction``,
      ``server_size`` / ``server_seed`` (optional, see below), and whatever
      knobs the dataset and the partitioner declare (``alpha``,
      ``classes_per_client``, ``min_examples``, ``data_dir``, ...), and ``storage``:
      ``"padded"`` (default; train ClientData [C, N, ...]) or ``"flat"`` (train
      :class:`~fedjax_sim.client_data.FlatClientData` [T, ...]: memory follows the examples,
      for heavy-tailed client sizes; runs are bit-identical under both).
    batch_size: client N is padded to a multiple of this.
    seed: the run seed (int >= 0). The partition, the per-client train/test
      split and a generated dataset each draw from their own NumPy stream
      (``fedjax_sim.seeding.numpy_seed(seed, "partition" | "split" |
      "dataset")``), so no two of them, and no two run seeds, share a stream.
    sharding: where the arrays live (default: the default device). The
      simulation passes a replicated ``NamedSharding`` over its mesh, which
      also works across processes (every process builds the same data).

  Returns:
    FederatedData on device; with ``server_size > 0``, ``aux["server_x"]``
    float32 [N_s, ...] (the unlabeled server set, carved out of the clients'
    training rows with the NumPy stream ``server_data`` of ``server_seed``,
    default 0) and ``aux["client_keep"]`` bool [C, N] (False on those rows).

  Raises:
    DatasetError, PartitionError: with a message naming the setting to change.
  """
  knobs = config_items(cfg)
  name = knobs.get("dataset", "digits")
  storage = knobs.get("storage", "padded") or "padded"
  if storage not in ("padded", "flat"):
    raise DatasetError(f"data.storage={storage!r}; set --config.data.storage to 'padded' or "
                       "'flat'.")
  fn = get_dataset(name)
  partitioner = part_lib.from_config(knobs)
  out = fn(**bind(fn, {**knobs, "seed": seed, "batch_size": batch_size,
                       "partitioner": partitioner}, what=f"dataset '{name}'"))
  server_size = int(knobs.get("server_size", 0) or 0)
  if isinstance(out, sources.Dataset):
    if server_size and storage == "flat":
      raise DatasetError("data.server_size > 0 masks rows of the padded client arrays; set "
                         "--config.data.storage=padded (or server_size=0).")
    fed, train_idx = _federate(out, int(knobs.get("num_clients", 100)), partitioner,
                               float(knobs.get("client_test_fraction", 0.2)), batch_size, seed,
                               storage)
    if server_size:
      keep, server_x = server_sets.server_holdout(
          train_idx, out.train_y, out.train_x, server_size, int(knobs.get("server_seed", 0)),
          fed.train.max_examples)
      fed.aux.update(server_x=server_x, client_keep=keep)
  elif isinstance(out, FederatedData):
    fed = out
    if storage == "flat":  # train and test splits, as pack_clients stores them
      fed = dataclasses.replace(
          fed, train=fed.train if isinstance(fed.train, FlatClientData) else flatten(fed.train),
          test=fed.test if isinstance(fed.test, FlatClientData) else flatten(fed.test))
    if server_size:
      raise DatasetError(f"dataset '{name}' defines its own clients, so the pipeline cannot hold "
                         "a server set out of them; set --config.data.server_size=0 or use a "
                         "centralized dataset (e.g. digits).")
  else:
    raise DatasetError(f"dataset '{name}' returned a {type(out).__name__}; a registered dataset "
                       "returns a fedjax_sim.data.Dataset or a FederatedData.")
  return on_device(fed, sharding)


def _federate(ds: sources.Dataset, num_clients: int, partitioner, test_fraction: float,
              batch_size: int, seed: int, storage: str = "padded"
              ) -> tuple[FederatedData, list[np.ndarray]]:
  """Partitions a centralized dataset's train split over clients; host FederatedData and the
  clients' training index lists (into ``ds.train_y``)."""
  parts = partitioner(ds.train_y, num_clients, seeding.numpy_seed(seed, "partition"))
  tr, te = part_lib.train_test_split_clients(parts, test_fraction,
                                             seeding.numpy_seed(seed, "split"))
  train, test = pack_clients(ds.train_x, ds.train_y, tr, te, batch_size, storage)
  return FederatedData(train, test, ds.test_x, ds.test_y, ds.num_classes,
                       tuple(ds.input_shape), ds.name), tr


@register_dataset("synthetic")
def synthetic(num_clients: int = 100, client_test_fraction: float = 0.2,
              synthetic_alpha: float = 1.0, synthetic_beta: float = 1.0, seed: int = 0,
              batch_size: int = 1, storage: str = "padded") -> FederatedData:
  """LEAF Synthetic(alpha, beta) (:func:`fedjax_sim.data.synthetic_leaf`): the generator
  defines the clients; each client's examples are split into its train and test parts, and
  the global test set is the union of the test parts (10 classes, 60 features).

  Raises:
    DatasetError: synthetic_alpha or synthetic_beta < 0.
  """
  if synthetic_alpha < 0 or synthetic_beta < 0:
    raise DatasetError(f"data.synthetic_alpha={synthetic_alpha} and data.synthetic_beta="
                       f"{synthetic_beta} must be >= 0; set --config.data.synthetic_alpha / "
                       "--config.data.synthetic_beta.")
  num_clients = int(num_clients)
  xs, ys = sources.synthetic_leaf(num_clients, synthetic_alpha, synthetic_beta,
                                  seed=seeding.numpy_seed(seed, "dataset"))
  offsets = np.cumsum([0] + [len(y) for y in ys])
  all_x, all_y = np.concatenate(xs), np.concatenate(ys)
  parts = [np.arange(offsets[k], offsets[k + 1]) for k in range(num_clients)]
  tr, te = part_lib.train_test_split_clients(parts, float(client_test_fraction),
                                             seeding.numpy_seed(seed, "split"))
  train, test = pack_clients(all_x, all_y, tr, te, batch_size, storage)
  gidx = np.concatenate(te)
  return FederatedData(train, test, all_x[gidx], all_y[gidx], 10, tuple(all_x.shape[1:]),
                       "synthetic")
