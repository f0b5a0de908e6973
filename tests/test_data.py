"""Partitioners, sources, packing, and the dataset / partitioner registries."""
import numpy as np
import pytest

from fedjax_sim.client_data import pack
from fedjax_sim.data import (DATASETS, PARTITIONERS, Dataset, DatasetError, FederatedData,
                             PartitionError, build_federated_data, load_digits, partition,
                             register_dataset, register_partitioner, synthetic_leaf,
                             train_test_split_clients)
from fedjax_sim.data import partitioners, registry

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
    ({"method": "dirichlet", "alpha": 0.0}, r"data.alpha=0.0 must be > 0 \(Dirichlet"),
    ({"method": "pra", "alpha": -1.0}, r"data.alpha=-1.0 must be > 0.*--config.data.alpha"),
    ({"method": "quantity_skew", "alpha": 0.0}, r"alpha=0.0 must be > 0.*--config.data.alpha"),
    ({"method": "dirichlet", "min_examples": -1}, r"min_examples=-1.*--config.data.min_examples"),
    ({"method": "dirichlet", "min_examples": 60}, r"--config.data.min_examples"),
    ({"method": "pathological", "classes_per_client": 0},
     r"classes_per_client=0 must be >= 1; set --config.data.classes_per_client"),
    ({"method": "pat", "classes_per_client": 11},
     r"exceeds the dataset's 10 classes; set --config.data.classes_per_client"),
    ({"method": "nope"}, "Unknown partition 'nope'; set --config.data.partition to one of "
                         "dirichlet, iid, pathological, quantity_skew"),
])
def test_partition_errors_name_the_setting(kw, match):
  """Each partitioner checks its own knobs; one line naming --config.data.<knob>."""
  method = kw.pop("method")
  with pytest.raises(PartitionError, match=match) as err:
    partition(LABELS, 10, method, seed=0, **kw)
  assert "\n" not in str(err.value)


def test_partition_takes_only_the_knobs_it_declares():
  """A data config's other entries are ignored; aliases and case resolve to the same function."""
  cfg = {"alpha": 0.3, "classes_per_client": 3, "min_examples": 2, "num_clients": 99,
         "dataset": "digits", "partition": "PRA"}
  got = partitioners.from_config(cfg)(LABELS, 10, 5)
  assert all(np.array_equal(a, b) for a, b in zip(
      got, partition(LABELS, 10, "pra", seed=5, alpha=0.3, classes_per_client=3)))
  want = partition(LABELS, 10, "dirichlet", seed=5, alpha=0.3)
  assert all(np.array_equal(a, b) for a, b in zip(got, want))
  assert registry.knobs_of(PARTITIONERS["dirichlet"], skip=3) == {
      "alpha": 0.5, "min_examples": 2, "max_tries": 1000}
  assert registry.knobs_of(PARTITIONERS["iid"], skip=3) == {}


@pytest.fixture
def scratch_registries():
  """Registries restored after the test (registrations are process-wide)."""
  saved = (dict(DATASETS), dict(PARTITIONERS), dict(registry._PARTITION_ALIASES))
  yield
  for table, old in zip((DATASETS, PARTITIONERS, registry._PARTITION_ALIASES), saved):
    table.clear()
    table.update(old)


def test_registered_partitioner_runs_through_the_pipeline(scratch_registries):
  """One decorator: the data config names it, and its own knob is read from the config."""
  @register_partitioner("label_blocks", aliases=("blocks",))
  def label_blocks(labels, num_clients, seed, *, block_shuffle: bool = False):
    order = np.argsort(labels, kind="stable")
    if block_shuffle:
      order = np.random.default_rng(seed).permutation(order)
    return [np.sort(p) for p in np.array_split(order, num_clients)]

  assert "label_blocks" in PARTITIONERS
  cfg = {"dataset": "digits", "num_clients": 10, "partition": "blocks",
         "client_test_fraction": 0.0}
  fd = build_federated_data(cfg, batch_size=10, seed=0)
  y, m = np.asarray(fd.train.y), np.asarray(fd.train.mask)
  assert all(len(np.unique(y[k][m[k]])) <= 3 for k in range(10))  # contiguous label ranges
  mixed = build_federated_data({**cfg, "block_shuffle": True}, batch_size=10, seed=0)
  assert min(len(np.unique(np.asarray(mixed.train.y)[k])) for k in range(10)) > 3
  with pytest.raises(ValueError, match="registered twice"):
    register_partitioner("label_blocks")(partitioners.iid)  # another function, same name
  with pytest.raises(ValueError, match="registered twice"):
    register_partitioner("mine", aliases=("pra",))(label_blocks)  # an alias taken
  register_partitioner("label_blocks", aliases=("blocks",))(label_blocks)  # its module re-ran
  assert PARTITIONERS["label_blocks"] is label_blocks


def test_registered_dataset_runs_through_the_pipeline(scratch_registries):
  """A centralized dataset is partitioned by the configured partitioner; a dataset that
  defines its clients returns a FederatedData; required knobs must be in the config."""
  @register_dataset("blobs")
  def blobs(num_points: int = 200, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, num_points).astype(np.int32)
    x = (rng.normal(size=(num_points, 4)) + y[:, None]).astype(np.float32)
    return Dataset(x, y, x[:20], y[:20], 3, "blobs")

  fd = build_federated_data({"dataset": "blobs", "num_clients": 5, "num_points": 300,
                             "partition": "iid"}, batch_size=4, seed=1)
  n = int(np.sum(fd.train.num_examples) + np.sum(fd.test.num_examples))
  assert n == 300 and fd.input_shape == (4,) and fd.num_classes == 3 and fd.aux == {}

  @register_dataset("needs_knob")
  def needs_knob(width: int, seed: int = 0) -> Dataset:
    raise AssertionError("not reached")

  with pytest.raises(DatasetError, match=r"needs --config.data.width"):
    build_federated_data({"dataset": "needs_knob"})
  with pytest.raises(ValueError, match="registered twice"):
    register_dataset("blobs")(needs_knob)
  assert isinstance(build_federated_data({"dataset": "synthetic", "num_clients": 3}),
                    FederatedData)


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


def test_unknown_dataset_error_lists_the_registered_names():
  with pytest.raises(DatasetError, match="Unknown dataset 'imagenet'; set --config.data.dataset "
                     "to one of digits, digits_multitask, leaf:<path>, mnist1d, mnist1d_multitask, "
                     "parquet:<path>, sqlite:<path>, synthetic, tfds:cifar10") as err:
    build_federated_data({"dataset": "imagenet"})
  assert "\n" not in str(err.value)


def test_synthetic_validates_its_knobs():
  with pytest.raises(DatasetError, match=r"synthetic_alpha=-1.0.*--config.data.synthetic_alpha"):
    build_federated_data({"dataset": "synthetic", "num_clients": 3, "synthetic_alpha": -1.0})


def test_server_holdout_is_hidden_from_clients_and_checked(small_config):
  """--config.data.server_size: aux server_x equals exactly the rows client_keep hides."""
  small_config.data.server_size = 50
  data = build_federated_data(small_config.data, batch_size=10, seed=0)
  keep, server_x = data.aux["client_keep"], data.aux["server_x"]
  x, m = np.asarray(data.train.x), np.asarray(data.train.mask)
  assert keep.shape == m.shape and not np.any(keep & ~m) and np.all(keep.sum(1) >= 1)
  held = x[m & ~keep]
  assert len(held) == 50 == len(server_x)
  rows = lambda a: {r.tobytes() for r in np.asarray(a).reshape(len(a), -1)}
  assert rows(held) == rows(server_x)
  plain = build_federated_data(dict(small_config.data, server_size=0), batch_size=10, seed=0)
  np.testing.assert_array_equal(np.asarray(plain.train.x), x)  # the clients' arrays unchanged
  for bad in (-1, 10**6):
    small_config.data.server_size = bad
    with pytest.raises(DatasetError, match=rf"server_size={bad} must be in \[1, "):
      build_federated_data(small_config.data, batch_size=10, seed=0)
  with pytest.raises(DatasetError, match="defines its own clients"):
    build_federated_data({"dataset": "synthetic", "num_clients": 3, "server_size": 5})


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
