"""Datasets, partitioners and packing into padded client arrays.

Entry point: :func:`build_federated_data` turns a data config into a
:class:`FederatedData` (device-resident train/test :class:`ClientData` plus the
global test set).
"""
from fedjax_sim.data.partitioners import (PARTITIONERS, PartitionError, partition,
                                       train_test_split_clients)
from fedjax_sim.data.pipeline import FederatedData, build_federated_data
from fedjax_sim.data.sources import Dataset, DatasetError, load, load_digits, load_tfds, synthetic_leaf

__all__ = [
    "PARTITIONERS", "PartitionError", "partition", "train_test_split_clients",
    "FederatedData", "build_federated_data", "Dataset", "DatasetError", "load",
    "load_digits", "load_tfds", "synthetic_leaf",
]
