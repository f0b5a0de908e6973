"""Partitioners, sources and packing."""
import numpy as np
import pytest

from fedjax_sim.client_data import pack
from fedjax_sim.data import (DatasetError, PartitionError, build_federated_data, load_digits,
                             partition, synthetic_leaf, train_test_split_clients)

LABELS = np.repeat(np.arange(10), 50)  # 500 examples, 10 classes


@pytest.mark.parametrize("method,kw", [("iid", {}), ("dirichlet", {"alpha": 0.3}),
                                       ("pathological", {"classes_per_client": 2}),
                                       ("quantity_skew", {"alpha": 0.5})])
def test_every_example_assigned_exactly_once_and_seeded(method, kw):
  parts = partition(LABELS, 20, method, seed=3, **kw)
  assert len(parts) == 20
  allidx = np.concatenate(parts)
  np.testing.assert_array_equal(np.sort(allidx), np.arange(len(LABELS)))
  again = partition(LABELS, 20, method, seed=3, **kw)
  other = partition(LABELS, 20, method, seed=4, **kw)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_pathological_limits_classes_per_client():
  parts = partition(LABELS, 25, "pathological", seed=0, classes_per_client=2)
  assert max(len(np.unique(LABELS[p])) for p in parts) <= 2


def test_dirichlet_skew_grows_as_alpha_shrinks():
  def mean_classes(alpha):
    parts = partition(LABELS, 10, "dirichlet", seed=0, alpha=alpha)
    return np.mean([len(np.unique(LABELS[p])) for p in parts])
  assert mean_classes(0.05) < mean_classes(100.0)


def test_quantity_skew_sizes_vary_but_labels_mix():
  parts = partition(LABELS, 10, "quantity_skew", seed=0, alpha=0.3)
  sizes = [len(p) for p in parts]
  assert max(sizes) > 3 * min(sizes)


@pytest.mark.parametrize("kw,match", [
    ({"method": "dirichlet", "alpha": 0.0}, "alpha"),
    ({"method": "dirichlet", "alpha": -1.0}, "alpha"),
    ({"method": "nope"}, "Unknown partition"),
])
def test_partition_errors_name_the_setting(kw, match):
  method = kw.pop("method")
  with pytest.raises(PartitionError, match=match):
    partition(LABELS, 10, method, seed=0, **kw)


def test_more_clients_than_examples_is_an_error():
  with pytest.raises(PartitionError, match="num_clients"):
    partition(LABELS[:5], 10, "iid", seed=0)


def test_client_train_test_split_is_disjoint_and_complete():
  parts = partition(LABELS, 10, "dirichlet", seed=0, alpha=0.5)
  tr, te = train_test_split_clients(parts, 0.2, seed=1)
  for p, a, b in zip(parts, tr, te):
    assert len(np.intersect1d(a, b)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), p)
    assert len(a) >= 1 and len(b) >= 1
  with pytest.raises(PartitionError, match="no data"):
    train_test_split_clients([np.array([1, 2]), np.array([], int)], 0.2, seed=0)


def test_pack_pads_and_masks():
  xs = [np.ones((3, 2), np.float32), 2 * np.ones((5, 2), np.float32)]
  ys = [np.zeros(3, np.int32), np.ones(5, np.int32)]
  d = pack(xs, ys, multiple=4)
  assert d.x.shape == (2, 8, 2) and d.mask.sum() == 8
  np.testing.assert_array_equal(d.num_examples, [3, 5])
  np.testing.assert_array_equal(d.mask[0], [1, 1, 1, 0, 0, 0, 0, 0])
  assert d.x[0, 3:].sum() == 0


def test_digits_is_real_and_split_fixed():
  ds = load_digits()
  assert ds.train_x.shape[1:] == (8, 8, 1) and ds.num_classes == 10
  assert len(ds.train_y) + len(ds.test_y) == 1797
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0
  np.testing.assert_array_equal(ds.test_y, load_digits().test_y)


def test_synthetic_has_requested_clients_and_depends_on_alpha():
  xs, ys = synthetic_leaf(7, 1.0, 1.0, seed=0)
  assert len(xs) == 7 and all(x.shape[1] == 60 for x in xs)
  assert all(len(x) == len(y) >= 4 for x, y in zip(xs, ys))
  xs2, _ = synthetic_leaf(7, 0.0, 0.0, seed=0)
  assert not np.allclose(xs[0][:4], xs2[0][:4])


def test_build_federated_data_digits(small_config):
  fd = build_federated_data(small_config.data, batch_size=10, seed=0)
  n_train = int(np.asarray(fd.train.num_examples).sum())
  n_test = int(np.asarray(fd.test.num_examples).sum())
  assert n_train + n_test == len(load_digits().train_y)
  assert fd.train.max_examples % 10 == 0


def test_unknown_dataset_error():
  with pytest.raises(DatasetError, match="Unknown dataset"):
    build_federated_data({"dataset": "imagenet"})


@pytest.mark.parametrize("name,shape,classes", [("mnist", (28, 28, 1), 10),
                                                ("fashion_mnist", (28, 28, 1), 10),
                                                ("cifar10", (32, 32, 3), 10),
                                                ("cifar100", (32, 32, 3), 100)])
def test_tfds_loader_with_mock_data(name, shape, classes):
  import tensorflow_datasets as tfds
  from fedjax_sim.data import load_tfds
  with tfds.testing.mock_data(num_examples=12):
    ds = load_tfds(name)
  assert ds.train_x.shape == (12, *shape) and ds.train_x.dtype == np.float32
  assert ds.num_classes == classes and ds.test_x.shape == (12, *shape)
  assert ds.train_y.dtype == np.int32 and ds.name == f"tfds:{name}"
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0


def test_tfds_missing_dataset_says_how_to_prepare(tmp_path):
  from fedjax_sim.data import load_tfds
  with pytest.raises(DatasetError, match="download_and_prepare"):
    load_tfds("fashion_mnist", data_dir=str(tmp_path))
