"""Multi-task digits: users with their own task (a label map) and a public set no user owns.

FedMuscle's setup (arXiv 2602.01626; ``docs/decisions.md#fedmuscle``): every
user has a task, a map of the digit label to its own classes (:data:`TASKS`),
trains on its own labeled digits and is tested on the global test set under
its task; a public split of the training digits, which no user holds, is the
unlabeled alignment data. Registered as dataset ``digits_multitask``
(``--config.data.dataset=digits_multitask``), and on MNIST-1D signals (Greydanus and
Kobak, arXiv 2011.14439; :mod:`fedjax_sim.data.mnist1d`) as ``mnist1d_multitask``:
the same tasks on its ten digit labels.

Axis legend: C users (clients), T tasks, N examples, N_pub public examples.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from fedjax_sim import seeding
from fedjax_sim.client_data import pack
from fedjax_sim.data import partitioners, sources
from fedjax_sim.data.federated import FederatedData, on_device
from fedjax_sim.data.mnist1d import load_mnist1d
from fedjax_sim.data.registry import DatasetError, register_dataset

__all__ = ["MAX_CLASSES", "TASKS", "TASK_NAMES", "build_multitask_digits",
           "build_multitask_mnist1d", "task_tables"]

# Tasks on digit labels 0..9: name -> (label map [10], number of classes).
TASKS: dict[str, tuple[tuple[int, ...], int]] = {
    "digit10": (tuple(range(10)), 10),  # 10-way digit classification
    "parity": (tuple(y % 2 for y in range(10)), 2),  # odd vs even
    "gt4": (tuple(int(y > 4) for y in range(10)), 2),  # 5..9 vs 0..4
    "mod3": (tuple(y % 3 for y in range(10)), 3),  # 3-way grouping {0,3,6,9} {1,4,7} {2,5,8}
}
TASK_NAMES = tuple(TASKS)
MAX_CLASSES = 10  # every task's classes fit the digit labels' 10


def task_tables() -> tuple[np.ndarray, np.ndarray]:
  """(label_map int32 [T, 10], num_classes int32 [T]) in :data:`TASK_NAMES` order."""
  label_map = np.array([TASKS[t][0] for t in TASK_NAMES], np.int32)
  num_classes = np.array([TASKS[t][1] for t in TASK_NAMES], np.int32)
  return label_map, num_classes


@register_dataset("digits_multitask")
def build_multitask_digits(num_clients: int = 12, examples_per_user: int = 40,
                           public_per_class: int = 30, tasks: Sequence[str] = TASK_NAMES,
                           public_seed: int = 0, seed: int = 0, batch_size: int = 10,
                           partitioner: Optional[Callable] = None) -> FederatedData:
  """The public split, users' partitions and task labels (scikit-learn digits).

  Public split (no user owns it): from ``load_digits()``'s train split (1,347
  examples; the 450-example test split is untouched), for each class c the
  first ``public_per_class`` indices of class c after a permutation from the
  ``server_data`` NumPy stream of ``public_seed`` (:mod:`fedjax_sim.seeding`);
  300 examples by default. It does not depend on ``seed``. The rest is
  partitioned over the users by ``partitioner`` on ``seed``'s ``partition``
  stream, and each user keeps ``examples_per_user`` examples of its part (the
  first after a shuffle from ``seed``'s ``split`` stream). User u has task
  ``tasks[u mod len(tasks)]``; its train and test labels are mapped to it.

  Args (each read from ``cfg.data.<name>`` by the pipeline):
    num_clients: C users.
    examples_per_user: training examples per user (fewer if its part is smaller).
    public_per_class: public examples per digit class.
    tasks: the task cycle over users (:data:`TASK_NAMES` entries).
    public_seed: seed of the public split.
    seed: the run seed (partition and per-user draw).
    batch_size: users' N is padded to a multiple of it.
    partitioner: ``(labels, num_clients, seed) -> parts``; the pipeline binds
      ``--config.data.partition`` and its knobs; default IID.

  Returns:
    FederatedData (on the default device): ``train`` [C, N] (labels mapped to
    each user's task), ``test`` [C, 450] (the global test set once per user,
    labels mapped), ``test_x``/``test_y`` the global test set with digit
    labels, ``num_classes`` 10, and ``aux``: ``public_x`` float32 [N_pub, 8, 8,
    1] (unlabeled), ``public_idx`` int64 [N_pub] (indices into the train
    split), ``tasks`` int32 [C] (task id per user, index into
    :data:`TASK_NAMES`), ``task_classes`` int32 [T] and ``task_label_map``
    int32 [T, 10] (:func:`task_tables`).

  Raises:
    DatasetError: a knob out of range (the message names ``--config.data.<knob>``).
  """
  return _multitask(sources.load_digits(), "digits_multitask", num_clients, examples_per_user,
                    public_per_class, tasks, public_seed, seed, batch_size, partitioner)


def _multitask(ds: sources.Dataset, name: str, num_clients, examples_per_user, public_per_class,
               tasks, public_seed, seed, batch_size, partitioner) -> FederatedData:
  """:func:`build_multitask_digits`'s construction on any 10-class dataset ``ds``."""
  smallest = int(np.bincount(ds.train_y, minlength=MAX_CLASSES).min())
  if not 1 <= public_per_class < smallest:
    raise DatasetError(f"data.public_per_class={public_per_class} must be in [1, {smallest - 1}] "
                       "(some digits of every class must stay with the users); set "
                       "--config.data.public_per_class.")
  if examples_per_user < 1:
    raise DatasetError(f"data.examples_per_user={examples_per_user} must be >= 1; set "
                       "--config.data.examples_per_user.")
  unknown = [t for t in tasks if t not in TASKS]
  if not tasks or unknown:
    raise DatasetError(f"data.tasks={tuple(tasks)!r}: every entry must be one of "
                       f"{', '.join(TASK_NAMES)}; set --config.data.tasks.")
  prng = seeding.numpy_rng(public_seed, "server_data")
  public_idx = np.sort(np.concatenate([
      prng.permutation(np.flatnonzero(ds.train_y == c))[:public_per_class]
      for c in range(MAX_CLASSES)]))
  rest = np.setdiff1d(np.arange(len(ds.train_y)), public_idx)
  if partitioner is None:
    partitioner = lambda labels, n, s: partitioners.partition(labels, n, "iid", s)
  parts = partitioner(ds.train_y[rest], num_clients, seeding.numpy_seed(seed, "partition"))
  urng = seeding.numpy_rng(seed, "split")
  parts = [rest[urng.permutation(p)[:examples_per_user]] for p in parts]
  label_map, task_classes = task_tables()
  user_tasks = np.array([TASK_NAMES.index(tasks[u % len(tasks)]) for u in range(num_clients)],
                        np.int32)
  train = pack([ds.train_x[p] for p in parts],
               [label_map[user_tasks[u]][ds.train_y[p]] for u, p in enumerate(parts)],
               batch_size)
  test = pack([ds.test_x] * num_clients, [label_map[t][ds.test_y] for t in user_tasks])
  aux = {"public_x": ds.train_x[public_idx], "public_idx": public_idx, "tasks": user_tasks,
         "task_classes": task_classes, "task_label_map": label_map}
  return on_device(FederatedData(train, test, ds.test_x, ds.test_y, MAX_CLASSES,
                                 tuple(ds.input_shape), name, aux))


@register_dataset("mnist1d_multitask")
def build_multitask_mnist1d(num_clients: int = 12, examples_per_user: int = 40,
                            public_per_class: int = 30, tasks: Sequence[str] = TASK_NAMES,
                            public_seed: int = 0, seed: int = 0, batch_size: int = 10,
                            partitioner: Optional[Callable] = None, num_samples: int = 5000,
                            mnist1d_seed: int = 42) -> FederatedData:
  """:func:`build_multitask_digits` on MNIST-1D (arXiv 2011.14439) instead of digits.

  The same public split, partition, per-user draw and task labels, drawn from
  :func:`fedjax_sim.data.mnist1d.load_mnist1d`'s train split (4,000 signals at
  the default ``num_samples``; 300 of them public by default) and tested on its
  global test split (1,000 signals) under each user's task.

  Args: as :func:`build_multitask_digits`, plus MNIST-1D's ``num_samples`` and
    ``mnist1d_seed`` (``cfg.data.<name>``; :func:`~fedjax_sim.data.mnist1d.load_mnist1d`).

  Returns:
    FederatedData as :func:`build_multitask_digits`'s, with ``test`` [C, N_test],
    ``public_x`` float32 [N_pub, 40] and name ``mnist1d_multitask``.

  Raises:
    DatasetError: a knob out of range (the message names ``--config.data.<knob>``).
  """
  return _multitask(load_mnist1d(num_samples, mnist1d_seed), "mnist1d_multitask", num_clients,
                    examples_per_user, public_per_class, tasks, public_seed, seed, batch_size,
                    partitioner)
