"""All data: datasets and partitioners (registries), auxiliary sets, packing into client arrays.

Entry point: :func:`build_federated_data` turns a data config into a
:class:`FederatedData` (device-resident train/test :class:`ClientData`, the
global test set, and auxiliary sets such as a server or public split in
``aux``). Datasets (:data:`DATASETS`) and partitioners (:data:`PARTITIONERS`)
are registries filled by :func:`register_dataset` / :func:`register_partitioner`
(one decorated function each; see :mod:`fedjax_sim.data.registry`).

Modules: ``registry`` (the two registries), ``sources`` (digits, TFDS,
LEAF Synthetic), ``partitioners``, ``pipeline`` (:func:`build_federated_data`,
dataset ``synthetic``), ``federated`` (:class:`FederatedData`),
``server_sets`` (CODIST's unlabeled server sets), ``multitask`` (FedMuscle's
multi-task users and public split, dataset ``digits_multitask``), ``mnist1d`` (MNIST-1D,
generated offline and cached), ``natural`` (natural partitions from LEAF JSON, FedJAX SQLite
and Parquet files: ``leaf:<dir>``, ``sqlite:<path>``, ``parquet:<path>``), ``text`` (the
next-character vocabulary and sequence encoding).
"""
from fedjax_sim.data.registry import (DATASETS, PARTITIONERS, DatasetError, PartitionError,
                                      register_dataset, register_partitioner)
from fedjax_sim.data.partitioners import partition, train_test_split_clients
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.pipeline import build_federated_data  # registers synthetic
from fedjax_sim.data.sources import Dataset, load, load_digits, load_tfds, synthetic_leaf
from fedjax_sim.data.multitask import TASK_NAMES, TASKS, build_multitask_digits  # registers it
from fedjax_sim.data.mnist1d import load_mnist1d  # registers mnist1d
from fedjax_sim.data.server_sets import CodistData, build_codist_data, server_holdout
from fedjax_sim.data.natural import load_leaf, load_parquet, load_sqlite  # registers them

__all__ = [
    "DATASETS", "PARTITIONERS", "PartitionError", "partition", "register_dataset",
    "register_partitioner", "train_test_split_clients", "FederatedData", "build_federated_data",
    "Dataset", "DatasetError", "load", "load_digits", "load_tfds", "synthetic_leaf", "TASKS",
    "TASK_NAMES", "build_multitask_digits", "CodistData", "build_codist_data", "server_holdout",
    "load_leaf", "load_parquet", "load_sqlite",
    "load_mnist1d",
]
