"""Models produce logits and embeddings; shipped configs load and run (TFDS via mock_data)."""
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from fedjax_sim import models
from fedjax_sim.launch import configs


@pytest.mark.parametrize("name,shape,kwargs", [
    ("mlp", (8, 8, 1), {}), ("cnn", (28, 28, 1), {}),
    ("cnn", (32, 32, 3), {"features": (64, 64), "dense": (384, 192)}),
    ("resnet", (32, 32, 3), {})])
def test_model_logits_and_embedding(name, shape, kwargs):
  m = models.build_model(name, 10, **kwargs)
  params = models.init_params(m, jax.random.PRNGKey(0), shape)
  x = jnp.ones((3, *shape))
  logits, z = m.apply({"params": params}, x, return_embedding=True)
  assert logits.shape == (3, 10) and z.ndim == 2 and z.shape[0] == 3
  assert jnp.allclose(logits, m.apply({"params": params}, x))


@pytest.mark.parametrize("arch", sorted(models.MODEL_ZOO))
def test_zoo_models_differ_in_size(arch):
  m = models.build_zoo_model(arch, 10)
  params = models.init_params(m, jax.random.PRNGKey(0), (8, 8, 1))
  _, z = m.apply({"params": params}, jnp.ones((2, 8, 8, 1)), return_embedding=True)
  assert z.shape[0] == 2


def _load(name):
  spec = importlib.util.spec_from_file_location(name, configs.path(name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# Each TFDS dataset and each algorithm of these configs runs once (corefed_cifar10 is
# corefed_fmnist's algorithm on fedavg_cifar10's data and CNN; its settings are checked in
# test_corefed_configs_are_the_papers_setup). A CIFAR-10 CNN run costs about 19 s here.
@pytest.mark.parametrize("name,dataset", [("fedavg_fmnist", "fashion_mnist"),
                                          ("fedavg_cifar10", "cifar10"),
                                          ("corefed_fmnist", "fashion_mnist")])
def test_tfds_configs_run_on_mock_data(tmp_path, name, dataset):
  import tensorflow_datasets as tfds
  from fedjax_sim.launch.experiment import train_and_evaluate
  cfg = _load(name).get_config("smoke")
  assert cfg.data.dataset == f"tfds:{dataset}"
  cfg.data.num_clients, cfg.clients_per_round, cfg.rounds = 6, 2, 2
  cfg.progress = False
  with tfds.testing.mock_data(num_examples=60):
    row = train_and_evaluate(cfg, str(tmp_path))
  assert 0.0 <= row["test_accuracy"] <= 1.0 and row["round"] == 2


def test_default_config_is_the_issue_setup():
  cfg = _load("fedavg_digits").get_config()
  assert (cfg.algorithm, cfg.data.dataset, cfg.data.num_clients, cfg.clients_per_round,
          cfg.data.partition, cfg.data.alpha) == ("fedavg", "digits", 100, 20, "dirichlet", 0.5)


@pytest.mark.parametrize("dataset", ["fmnist", "cifar10"])
def test_corefed_configs_are_the_papers_setup(dataset):
  """The CoRe-Fed paper's setup (docs/decisions.md#core-fed): 100 clients, 20 per
  round, Dir(0.5), batch 50, E = 1, unequal participation."""
  cfg = _load(f"corefed_{dataset}").get_config()
  assert (cfg.algorithm, cfg.sampler, cfg.data.num_clients, cfg.clients_per_round,
          cfg.data.partition, cfg.data.alpha, cfg.batch_size, cfg.local_epochs) == (
              "corefed", "availability", 100, 20, "dirichlet", 0.5, 50, 1)


def test_corefed_ablation_variants_and_grid():
  ablation = _load("corefed_ablation")
  expect = {"corefed": ("corefed", False), "refed": ("refed", False),
            "cofed": ("cofed", False), "reference": ("corefed", True),
            "fedavg": ("fedavg", False), "qffl": ("qffl", False),
            "fedmdfg": ("fedmdfg", False)}
  assert set(ablation.VARIANTS) == set(expect)
  for dataset in ("digits", "fmnist", "cifar10"):
    base = _load(f"corefed_{dataset}").get_config()
    for variant, (algorithm, reference) in expect.items():
      cfg = ablation.get_config(f"{dataset}:{variant}")
      assert cfg.algorithm == algorithm, (dataset, variant)
      assert bool(cfg.get("corefed", {}).get("reference_code", False)) == reference, (
          dataset, variant)
      # Only the method changes: data, cohort and optimizer are the dataset's.
      assert (cfg.data.dataset, cfg.clients_per_round, cfg.batch_size, cfg.client_lr) == (
          base.data.dataset, base.clients_per_round, base.batch_size, base.client_lr)
  assert sorted(ablation.GRID) == [(0.5, 0.5), (0.5, 2.0), (2.0, 0.5), (2.0, 2.0)]
  for bad in ("mnist:corefed", "digits:fedprox"):
    with pytest.raises(ValueError, match="must be"):
      ablation.get_config(bad)


def test_corefed_digits_config_has_skewed_participation():
  """The issue's digits setup: some clients participate about 5x more than others."""
  import numpy as np
  from fedjax_sim import sampling
  cfg = _load("corefed_digits").get_config()
  assert (cfg.algorithm, cfg.data.dataset, cfg.data.num_clients, cfg.clients_per_round,
          cfg.data.alpha) == ("corefed", "digits", 100, 20, 0.5)
  f = np.sort(sampling.participation_frequencies(
      sampling.build_sampler(cfg, cfg.data.num_clients), 300, seed=0))
  assert f[-10:].mean() / f[:10].mean() >= 5.0
