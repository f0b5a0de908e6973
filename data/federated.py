""":class:`FederatedData`: what a simulation reads, and packing client index lists into it."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from fedjax_sim.client_data import AnyClientData, ClientData, pack, pack_flat, to_device


@dataclasses.dataclass
class FederatedData:
  """Everything a simulation reads.

  Attributes:
    train: ClientData [C, N, ...]: each client's local training examples.
    test: ClientData [C, N_t, ...]: each client's own test split (per-client
      accuracy / fairness metrics).
    test_x: float32 [N_g, ...]: the global test set.
    test_y: int32 [N_g].
    num_classes: number of labels.
    input_shape: shape of one example.
    name: dataset name.
    aux: auxiliary sets some methods need, name -> host NumPy array (the
      algorithm places what it uses on device), e.g. ``server_x`` float32
      [N_s, ...] and ``client_keep`` bool [C, N] (an unlabeled server set held
      out of the clients' training rows, for CODIST; ``--config.data.server_size``),
      or ``public_x`` float32 [N_pub, ...], ``tasks`` int32 [C] and
      ``task_classes`` int32 [T] (FedMuscle's public set and per-user tasks;
      dataset ``digits_multitask``). Empty for plain datasets.
  """
  train: ClientData
  test: ClientData
  test_x: Any
  test_y: Any
  num_classes: int
  input_shape: tuple[int, ...]
  name: str
  aux: dict = dataclasses.field(default_factory=dict)

  @property
  def num_clients(self) -> int:
    return self.train.num_clients

  def summary(self) -> str:
    n = np.asarray(self.train.num_examples)
    aux = f", aux {', '.join(sorted(self.aux))}" if self.aux else ""
    return (f"{self.name}: {self.num_clients} clients, train examples/client "
            f"min {n.min()} median {int(np.median(n))} max {n.max()} (padded to "
            f"{self.train.max_examples}), global test {len(self.test_y)}{aux}")


def pack_clients(x: np.ndarray, y: np.ndarray, train_idx: Sequence[np.ndarray],
                 test_idx: Sequence[np.ndarray], batch_size: int, storage: str = "padded"
                 ) -> tuple[AnyClientData, AnyClientData]:
  """Host ClientData (train, test) of per-client index lists into examples ``x``, labels ``y``.

  Args:
    x: float32 [N, ...] examples.  y: int [N] labels.
    train_idx, test_idx: C int arrays each, indices into x.
    batch_size: the train arrays' N is padded to a multiple of it.
    storage: ``"padded"`` (ClientData [C, N, ...]) or ``"flat"`` (train and test as
      :class:`~fedjax_sim.client_data.FlatClientData`, never materializing C x N rows).
  """
  if storage == "flat":
    train = pack_flat([x[i] for i in train_idx], [y[i] for i in train_idx], batch_size)
    return train, pack_flat([x[i] for i in test_idx], [y[i] for i in test_idx])
  train = pack([x[i] for i in train_idx], [y[i] for i in train_idx], batch_size)
  test = pack([x[i] for i in test_idx], [y[i] for i in test_idx])
  return train, test


def on_device(fed: FederatedData, sharding: Any = None) -> FederatedData:
  """``fed`` with train, test, test_x and test_y on device under ``sharding`` (aux stays host)."""
  return dataclasses.replace(
      fed, train=to_device(fed.train, sharding), test=to_device(fed.test, sharding),
      test_x=jax.device_put(np.asarray(fed.test_x), sharding),
      test_y=jax.device_put(np.asarray(fed.test_y), sharding),
      aux={k: np.asarray(v) for k, v in fed.aux.items()})
