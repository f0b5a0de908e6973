"""Dataset ``mnist1d_multitask`` (data/multitask.py): FedMuscle's multi-task users on MNIST-1D
signals (arXiv 2011.14439), and the drivers' MNIST-1D variants (configs only, no training)."""
import numpy as np
import pytest

from fedjax_sim.data import DatasetError, build_federated_data
from fedjax_sim.data.mnist1d import load_mnist1d
from fedjax_sim.data.multitask import TASK_NAMES, build_multitask_mnist1d, task_tables

SMALL = dict(num_clients=8, examples_per_user=10, public_per_class=3, num_samples=500)


def _rows(x_users, x_all):
  """Index into x_all [N, 40] of every row of x_users [M, 40] (rows are distinct signals)."""
  index = {r.tobytes(): i for i, r in enumerate(x_all)}
  return np.array([index[r.tobytes()] for r in x_users])


def test_users_public_split_and_task_labels_come_from_mnist1d():
  d = build_multitask_mnist1d(**SMALL, seed=1)
  ds = load_mnist1d(500)
  label_map, task_classes = task_tables()
  assert d.name == "mnist1d_multitask" and d.input_shape == (40,) and d.num_classes == 10
  pub = d.aux["public_idx"]
  # 3 public signals per class, from the train split, in aux["public_x"].
  np.testing.assert_array_equal(np.bincount(ds.train_y[pub], minlength=10), np.full(10, 3))
  np.testing.assert_array_equal(d.aux["public_x"], ds.train_x[pub])
  np.testing.assert_array_equal(d.aux["tasks"], [TASK_NAMES.index(TASK_NAMES[u % 4])
                                                 for u in range(8)])
  np.testing.assert_array_equal(d.aux["task_classes"], task_classes)
  x, y, m = (np.asarray(a) for a in (d.train.x, d.train.y, d.train.mask))
  seen = []
  for u in range(8):
    rows = _rows(x[u][m[u]], ds.train_x)
    assert 1 <= len(rows) <= 10 and not set(rows) & set(pub.tolist())
    # Labels are the signal's digit label mapped to the user's task.
    np.testing.assert_array_equal(y[u][m[u]], label_map[d.aux["tasks"][u]][ds.train_y[rows]])
    # The test split is the global test set under the user's task.
    np.testing.assert_array_equal(np.asarray(d.test.x)[u], ds.test_x)
    np.testing.assert_array_equal(np.asarray(d.test.y)[u],
                                  label_map[d.aux["tasks"][u]][ds.test_y])
    seen += rows.tolist()
  assert len(seen) == len(set(seen))  # no signal is held by two users


def test_public_split_does_not_depend_on_the_run_seed_and_users_do():
  a, b = build_multitask_mnist1d(**SMALL, seed=0), build_multitask_mnist1d(**SMALL, seed=1)
  np.testing.assert_array_equal(a.aux["public_idx"], b.aux["public_idx"])
  assert not np.array_equal(np.asarray(a.train.x), np.asarray(b.train.x))


def test_pipeline_binds_the_dirichlet_partition_and_mnist1d_knobs():
  cfg = {"dataset": "mnist1d_multitask", "partition": "dirichlet", "alpha": 0.5,
         "num_clients": 20, "examples_per_user": 40, "public_per_class": 3, "num_samples": 500,
         "tasks": TASK_NAMES, "public_seed": 0}
  d = build_federated_data(cfg, batch_size=10, seed=0)
  n = np.asarray(d.train.num_examples)
  assert d.train.y.shape[0] == 20 and n.max() <= 40 and n.sum() <= 400 - 30
  assert len(set(n.tolist())) > 3  # Dirichlet sizes differ across users, unlike IID
  with pytest.raises(DatasetError, match="--config.data.public_per_class"):
    build_multitask_mnist1d(**{**SMALL, "public_per_class": 40})


def test_driver_configs_mnist1d_variants():
  from fedjax_sim.launch.configs import fedmuscle_digits, fedre_digits
  m = fedmuscle_digits.get_config("mnist1d")
  assert (m.data.dataset, m.data.num_clients, m.data.partition, m.data.alpha) == (
      "mnist1d_multitask", 100, "dirichlet", 0.5)
  assert fedmuscle_digits.get_config("mnist1d,smoke").rounds == 2
  assert fedmuscle_digits.get_config("mnist1d,dir01").data.alpha == 0.1
  r = fedre_digits.get_config("mnist1d")
  assert (r.data.dataset, r.data.num_clients, r.clients_per_round, r.data.partition,
          r.data.alpha) == ("mnist1d", 100, 20, "dirichlet", 0.5)
  assert fedre_digits.get_config("mnist1d,c100k10").clients_per_round == 10
  t = fedre_digits.get_config("mnist1d,c10,pat")
  assert (t.data.num_clients, t.clients_per_round, t.batch_size, t.data.partition) == (
      10, 10, 32, "pat")
  with pytest.raises(ValueError, match="exclude each other"):
    fedre_digits.get_config("mnist1d,c10,c100k10")
  assert fedre_digits.get_config("mnist1d,pra").data.alpha == 0.1
  # The digits settings are untouched by the new options.
  assert fedre_digits.get_config().to_dict() == fedre_digits.get_config("pra").to_dict()
  assert fedre_digits.get_config().data.dataset == "digits"
  with pytest.raises(ValueError, match="mnist1d"):
    fedmuscle_digits.get_config("cifar")


def test_fedre_driver_method_specs_carry_typed_knob_overrides():
  """``fedre@variant=RSR@resample=false`` names one ablation run; bad specs fail with the fix."""
  from fedjax_sim.launch.experiments import fedre_digits as driver
  assert driver.parse_method("fedre@variant=RSR@resample=false") == (
      "fedre", {"variant": "RSR", "resample": "false"})
  assert driver.parse_method("fedproto") == ("fedproto", {})
  assert driver.label("fedre@variant=VAP") == "FedRE (VAP)"
  assert driver.label("fedre@rm=max") == "FedRE (RAP) [rm=max]"
  assert driver._typed(True, "false", "x") is False and driver._typed(32, "16", "x") == 16
  with pytest.raises(ValueError, match="knob=value"):
    driver.parse_method("fedre@RSR")
  with pytest.raises(ValueError, match="true or false"):
    driver._typed(True, "no", "x")
