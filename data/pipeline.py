"""From a data config to device-resident federated train/test arrays."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from fedjax_sim.client_data import ClientData, pack, to_device
from fedjax_sim import seeding
from fedjax_sim.data import partitioners as part_lib
from fedjax_sim.data import sources


@dataclasses.dataclass
class FederatedData:
  """Everything a simulation reads, resident on device.

  Attributes:
    train: ClientData [C, N, ...]: each client's local training examples.
    test: ClientData [C, N_t, ...]: each client's own test split (per-client
      accuracy / fairness metrics).
    test_x: float32 [N_g, ...]: the global test set.
    test_y: int32 [N_g].
    num_classes: number of labels.
    input_shape: shape of one example.
    name: dataset name.
  """
  train: ClientData
  test: ClientData
  test_x: jax.Array
  test_y: jax.Array
  num_classes: int
  input_shape: tuple[int, ...]
  name: str

  @property
  def num_clients(self) -> int:
    return self.train.num_clients

  def summary(self) -> str:
    n = np.asarray(self.train.num_examples)
    return (f"{self.name}: {self.num_clients} clients, train examples/client "
            f"min {n.min()} median {int(np.median(n))} max {n.max()} (padded to "
            f"{self.train.max_examples}), global test {len(self.test_y)}")


def build_federated_data(cfg: Any, batch_size: int = 1, seed: int = 0,
                         sharding: Any = None) -> FederatedData:
  """Loads, partitions, splits and packs a dataset described by ``cfg``.

  Args:
    cfg: a ConfigDict (or anything with attributes) with ``dataset``,
      ``num_clients``, ``partition``, ``alpha``, ``classes_per_client``,
      ``min_examples``, ``client_test_fraction``, ``data_dir`` and, for
      ``synthetic``, ``synthetic_alpha``, ``synthetic_beta``.
    batch_size: client N is padded to a multiple of this.
    seed: the run seed (int >= 0). The partition, the per-client train/test
      split and a generated dataset each draw from their own NumPy stream
      (``fedjax_sim.seeding.numpy_seed(seed, "partition" | "split" |
      "dataset")``), so no two of them, and no two run seeds, share a stream.
    sharding: where the arrays live (default: the default device). The
      simulation passes a replicated ``NamedSharding`` over its mesh, which
      also works across processes (every process builds the same data).

  Raises:
    DatasetError, PartitionError: with a message naming the setting to change.
  """
  get = lambda k, d=None: getattr(cfg, k, d) if not isinstance(cfg, dict) else cfg.get(k, d)
  name = get("dataset", "digits")
  num_clients = int(get("num_clients", 100))
  test_fraction = float(get("client_test_fraction", 0.2))
  if name == "synthetic":
    xs, ys = sources.synthetic_leaf(
        num_clients, get("synthetic_alpha", 1.0), get("synthetic_beta", 1.0),
        seed=seeding.numpy_seed(seed, "dataset"))
    offsets = np.cumsum([0] + [len(y) for y in ys])
    all_x, all_y = np.concatenate(xs), np.concatenate(ys)
    parts = [np.arange(offsets[k], offsets[k + 1]) for k in range(num_clients)]
    tr, te = part_lib.train_test_split_clients(parts, test_fraction,
                                               seeding.numpy_seed(seed, "split"))
    train = pack([all_x[i] for i in tr], [all_y[i] for i in tr], batch_size)
    test = pack([all_x[i] for i in te], [all_y[i] for i in te])
    gidx = np.concatenate(te)
    test_x, test_y, num_classes = all_x[gidx], all_y[gidx], 10
    input_shape = all_x.shape[1:]
  else:
    ds = sources.load(name, get("data_dir"))
    parts = part_lib.partition(
        ds.train_y, num_clients, get("partition", "dirichlet"), seeding.numpy_seed(seed, "partition"),
        alpha=float(get("alpha", 0.5)), classes_per_client=int(get("classes_per_client", 2)),
        min_examples=int(get("min_examples", 2)))
    tr, te = part_lib.train_test_split_clients(parts, test_fraction,
                                               seeding.numpy_seed(seed, "split"))
    train = pack([ds.train_x[i] for i in tr], [ds.train_y[i] for i in tr], batch_size)
    test = pack([ds.train_x[i] for i in te], [ds.train_y[i] for i in te])
    test_x, test_y, num_classes, input_shape = ds.test_x, ds.test_y, ds.num_classes, ds.input_shape
  return FederatedData(to_device(train, sharding), to_device(test, sharding),
                       jax.device_put(np.asarray(test_x), sharding),
                       jax.device_put(np.asarray(test_y), sharding), num_classes,
                       tuple(input_shape), name)
