"""MNIST-1D (data/mnist1d.py) and the 1-D models (fedjax_sim/models.py: cnn1d, gru).

The models are checked against NumPy restatements of the MNIST-1D paper's
PyTorch modules (arXiv 2011.14439, its models.py: ``ConvBase``, ``GRUBase``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim import models


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _conv1d(z, kernel, bias, stride, pad):
  """PyTorch Conv1d(padding=pad, stride=stride) on z [B, L, C_in]; kernel [k, C_in, C_out]."""
  z = np.pad(z, ((0, 0), (pad, pad), (0, 0)))
  k = kernel.shape[0]
  out_len = (z.shape[1] - k) // stride + 1
  return np.stack([np.einsum("bkc,kcd->bd", z[:, t * stride:t * stride + k], kernel)
                   for t in range(out_len)], axis=1) + bias


def _sigmoid(a):
  return 1.0 / (1.0 + np.exp(-a))


def _gru(z, p, reverse=False):
  """PyTorch nn.GRU equations (b_hr, b_hz folded into b_ir, b_iz) over z [B, T, 1]."""
  steps = range(z.shape[1])[::-1] if reverse else range(z.shape[1])
  h = np.zeros((z.shape[0], p["hr"]["kernel"].shape[0]))
  out = [None] * z.shape[1]
  for t in steps:
    x = z[:, t]
    r = _sigmoid(x @ p["ir"]["kernel"] + p["ir"]["bias"] + h @ p["hr"]["kernel"])
    u = _sigmoid(x @ p["iz"]["kernel"] + p["iz"]["bias"] + h @ p["hz"]["kernel"])
    n = np.tanh(x @ p["in"]["kernel"] + p["in"]["bias"]
                + r * (h @ p["hn"]["kernel"] + p["hn"]["bias"]))
    h = (1 - u) * n + u * h
    out[t] = h
  return np.stack(out, axis=1)


def test_cnn1d_is_the_papers_convbase():
  """Three stride-2, padding-1 ReLU convs (kernels 5, 3, 3; 25 channels): 40 -> 19 -> 10 -> 5,
  a 125-d embedding, 5,210 parameters (the paper's ConvBase count)."""
  m = models.build_model("cnn1d", 10)
  params = models.init_params(m, jax.random.PRNGKey(0), (40,))
  assert sum(a.size for a in jax.tree_util.tree_leaves(params)) == 5210
  x = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32)
  logits, emb = m.apply({"params": params}, jnp.asarray(x), return_embedding=True)
  p = _np(params)
  z = x[..., None].astype(np.float64)
  for i, k in enumerate((5, 3, 3)):
    z = np.maximum(_conv1d(z, p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"], 2, 1), 0)
    assert z.shape[1] == (19, 10, 5)[i] and p[f"Conv_{i}"]["kernel"].shape[0] == k
  z = z.reshape(3, -1)
  np.testing.assert_allclose(emb, z, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, z @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"],
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("directions", [2, 1])
def test_gru_is_the_papers_grubase(directions):
  """GRU(6) over the 40 steps (both directions' outputs concatenated), every step's output
  flattened into the embedding, one Dense on top."""
  m = models.build_model("gru", 10, directions=directions)
  params = models.init_params(m, jax.random.PRNGKey(1), (40,))
  x = np.random.default_rng(1).normal(size=(2, 40)).astype(np.float32)
  logits, emb = m.apply({"params": params}, jnp.asarray(x), return_embedding=True)
  p = _np(params)
  z = x[..., None].astype(np.float64)
  h = _gru(z, p["GRUCell_0"])
  if directions == 2:
    h = np.concatenate([h, _gru(z, p["GRUCell_1"], reverse=True)], axis=-1)
  h = h.reshape(2, -1)
  assert h.shape == (2, 40 * 6 * directions)
  np.testing.assert_allclose(emb, h, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"],
                             rtol=1e-4, atol=1e-5)


def test_1d_models_reject_bad_layouts():
  x = jnp.ones((1, 40))
  with pytest.raises(ValueError, match="kernel_sizes"):
    models.init_params(models.build_model("cnn1d", 10, features=(8, 8), kernel_sizes=(3,)),
                       jax.random.PRNGKey(0), (40,))
  with pytest.raises(ValueError, match="directions"):
    models.build_model("gru", 10, directions=3).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("arch,dim", [("cnn1d_s", 16 * 10), ("cnn1d_m", 125), ("gru_s", 480)])
def test_zoo_1d_models_embed(arch, dim):
  """The zoo entries read a [40] signal; the registry reads D off their classifier."""
  from fedjax_sim.algorithms.registry import BuildContext, DataSpec
  m = models.build_zoo_model(arch, 10)
  params = models.init_params(m, jax.random.PRNGKey(0), (40,))
  _, z = m.apply({"params": params}, jnp.ones((2, 40)), return_embedding=True)
  assert z.shape == (2, dim)
  kind, kwargs = models.MODEL_ZOO[arch]
  ctx = BuildContext(spec=DataSpec((40,), 10, 1), seed=0, clients_per_round=1, rounds=1,
                     client={}, server={}, model=kind, model_kwargs=kwargs)
  assert ctx.embedding_fn()[1] == dim


# ---------------------------------------------------------------------------------------------
# The dataset: offline generation, the cache, the knobs, the pipeline.

from fedjax_sim.data import mnist1d as m1d  # noqa: E402
from fedjax_sim.data.registry import DatasetError  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """A fresh cache directory for the test (FEDJAX_SIM_CACHE)."""
  monkeypatch.setenv("FEDJAX_SIM_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


@pytest.fixture
def offline(monkeypatch):
  """Any network use fails: sockets cannot connect and requests cannot send."""
  import socket

  import requests

  def refuse(*args, **kwargs):
    raise AssertionError("MNIST-1D touched the network")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(requests.Session, "request", refuse)
  monkeypatch.setattr(requests, "get", refuse)


def test_generator_args_are_the_papers():
  """Our pinned arguments are the package's defaults (the paper's): a changed package default
  would silently change the dataset."""
  from mnist1d.data import get_dataset_args
  pkg = get_dataset_args(as_dict=True)
  assert {k: v for k, v in pkg.items() if k not in ("url", "num_samples", "seed")} == \
      m1d.GENERATOR_ARGS
  assert (pkg["num_samples"], pkg["seed"]) == (5000, 42)
  from fedjax_sim.data.registry import get_dataset, knobs_of
  assert knobs_of(get_dataset("mnist1d")) == {"num_samples": 5000, "mnist1d_seed": 42}


def test_default_is_the_papers_split_generated_offline(cache, offline):
  """5,000 examples: 4,000 train and 1,000 test of [40] float32, standardized, balanced, equal
  to the package's generator with the same arguments; no network; global RNGs untouched."""
  import random

  from mnist1d.data import make_dataset
  from mnist1d.utils import ObjectView
  np.random.seed(7)
  random.seed(7)
  before = (np.random.get_state()[1].copy(), random.getstate())
  ds = m1d.load_mnist1d()
  assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
  assert ds.train_x.shape == (4000, 40) and ds.test_x.shape == (1000, 40)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert ds.input_shape == (40,) and ds.num_classes == 10 and ds.name == "mnist1d"
  ys = np.concatenate([ds.train_y, ds.test_y])
  assert np.bincount(ys).tolist() == [500] * 10
  xs = np.concatenate([ds.train_x, ds.test_x])
  assert abs(xs.mean()) < 1e-4 and abs(xs.std() - 1) < 1e-3
  ref = make_dataset(ObjectView({**m1d.GENERATOR_ARGS, "num_samples": 5000, "seed": 42}))
  np.testing.assert_array_equal(ds.train_x, ref["x"].astype(np.float32))
  np.testing.assert_array_equal(ds.test_y, ref["y_test"])
  assert len(list((cache / "mnist1d").glob("*.npz"))) == 1


def test_cache_is_read_and_a_corrupt_file_regenerated(cache, offline, monkeypatch):
  first = m1d.load_arrays(200, seed=3)
  path = m1d.cache_path(200, 3)
  assert path.startswith(str(cache)) and "n200_seed3_" in path
  import mnist1d.data

  def fail(*args, **kwargs):
    raise AssertionError("regenerated although the cache holds the arrays")

  with monkeypatch.context() as m:
    m.setattr(mnist1d.data, "make_dataset", fail)
    again = m1d.load_arrays(200, seed=3)
  for k in first:
    np.testing.assert_array_equal(again[k], first[k])
  wrong = dict(first, x=first["x"][:10])  # a readable file that does not hold what it should
  for content in (b"not an npz file", None):
    if content is None:
      np.savez(path, **wrong)
    else:
      with open(path, "wb") as f:
        f.write(content)
    fixed = m1d.load_arrays(200, seed=3)
    for k in first:
      np.testing.assert_array_equal(fixed[k], first[k])
    with np.load(path) as f:  # rewritten
      assert f["x"].shape == (160, 40)
  assert not m1d.load_arrays(200, seed=4)["x"].tolist() == first["x"].tolist()


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv("FEDJAX_SIM_CACHE", str(blocker / "sub"))
  assert m1d.load_arrays(100, seed=0)["x"].shape == (80, 40)


@pytest.mark.parametrize("knobs,match", [
    ({"num_samples": 105}, "data.num_samples=105 must be a multiple of 10"),
    ({"num_samples": 10}, "data.num_samples=10 .*at least 20"),
    ({"num_samples": "5000"}, "data.num_samples='5000'"),
    ({"mnist1d_seed": -1}, "data.mnist1d_seed=-1"),
])
def test_bad_knobs_fail_with_one_line(knobs, match):
  with pytest.raises(DatasetError, match=match) as err:
    m1d.load_mnist1d(**knobs)
  assert "\n" not in str(err.value) and "--config.data." in str(err.value)


def test_fedavg_mnist1d_config_runs(cache, tmp_path):
  """--config.data.dataset=mnist1d through the library's run: the shipped config's smoke
  variant at 200 examples over 10 clients, the paper's CNN; knobs reach the dataset."""
  import importlib.util

  from fedjax_sim.launch import configs
  from fedjax_sim.launch.experiment import build_experiment, train_and_evaluate
  spec = importlib.util.spec_from_file_location("fedavg_mnist1d", configs.path("fedavg_mnist1d"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("smoke")
  assert (cfg.data.dataset, cfg.data.num_clients, cfg.data.partition, cfg.data.alpha,
          cfg.model) == ("mnist1d", 100, "dirichlet", 0.5, "cnn1d")
  cfg.data.num_samples, cfg.data.num_clients, cfg.clients_per_round = 200, 10, 5
  cfg.rounds, cfg.progress = 5, False
  exp = build_experiment(cfg)
  assert exp.data.input_shape == (40,) and len(exp.data.test_y) == 40
  assert int(np.asarray(exp.data.train.num_examples).sum()
             + np.asarray(exp.data.test.num_examples).sum()) == 160
  row = train_and_evaluate(cfg, str(tmp_path / "run"), experiment=exp)
  assert row["round"] == 5 and 0.0 <= row["test_accuracy"] <= 1.0
  with pytest.raises(ValueError, match="unknown option"):
    mod.get_config("cnn1d,bogus")


def test_centralized_option_is_centralized_adam(cache):
  """The report's centralized protocol (one client, one local step of lr 1, server Adam) is
  Adam on the minibatch gradient: with B = the whole training set the minibatch is the full
  batch whatever its order, so 3 rounds equal 3 steps of optax.adam(1e-2, 0.9, 0.999, 1e-8)."""
  import importlib.util

  import optax

  from fedjax_sim.launch import configs
  from fedjax_sim.launch.experiment import build_experiment
  from fedjax_sim.round import init_state, make_round
  spec = importlib.util.spec_from_file_location("fedavg_mnist1d", configs.path("fedavg_mnist1d"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("centralized,logreg")
  assert (cfg.data.num_clients, cfg.clients_per_round, cfg.data.client_test_fraction,
          cfg.batch_size, cfg.local_steps, cfg.client_lr, cfg.server_optimizer, cfg.server_lr,
          cfg.server_b2, cfg.server_tau, cfg.rounds, tuple(cfg.model_kwargs.hidden)) == (
              1, 1, 0.0, 100, 1, 1.0, "adam", 1e-2, 0.999, 1e-8, 6000, ())
  cfg.data.num_samples, cfg.batch_size, cfg.progress = 200, 160, False
  exp = build_experiment(cfg)
  state = init_state(exp.algorithm, exp.sampler, 1, cfg.seed, exp.mesh)
  params = jax.device_get(state.server.params)
  round_fn = make_round(exp.algorithm, exp.sampler, seed=cfg.seed, mesh=exp.mesh,
                        rounds_per_call=3)
  state, _ = round_fn(state, exp.data.train)
  x = jnp.asarray(exp.data.train.x[0][:160])
  y = jnp.asarray(exp.data.train.y[0][:160])
  assert int(exp.data.train.num_examples[0]) == 160

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(exp.model.apply({"params": p}, x),
                                                           y).mean()

  opt = optax.adam(1e-2, b1=0.9, b2=0.999, eps=1e-8)
  opt_state = opt.init(params)
  for _ in range(3):
    updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         jax.device_get(state.server.params), params)


def test_gru_round_equals_reference_loop(cache):
  """FedAvg with the GRU on MNIST-1D: the vectorized round (vmapped clients running the GRU's
  scan inside their local-step loop, padded chunks) equals the per-client reference loop."""
  import importlib.util

  from fedjax_sim.launch import configs
  from fedjax_sim.launch.experiment import build_experiment
  from fedjax_sim.reference import make_reference_round
  from fedjax_sim.round import init_state, make_round
  spec = importlib.util.spec_from_file_location("fedavg_mnist1d", configs.path("fedavg_mnist1d"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("gru")
  cfg.data.num_samples, cfg.data.num_clients, cfg.clients_per_round = 200, 8, 3
  cfg.progress = False
  exp = build_experiment(cfg)
  state0 = init_state(exp.algorithm, exp.sampler, 8, seed=0, mesh=exp.mesh)
  vec = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, chunk_size=2,
                   donate=False)  # K = 3: two chunks, one padding slot
  ref = make_reference_round(exp.algorithm, exp.sampler, seed=0, sort_by_size=True)
  got = want = state0
  for r in range(2):
    got, _ = vec(got, exp.data.train)
    want, _ = ref(want, exp.data.train)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"round {r}"),
        jax.device_get(got.server.params), jax.device_get(want.server.params))
  assert not np.allclose(jax.device_get(got.server.params["Dense_0"]["kernel"]),
                         jax.device_get(state0.server.params["Dense_0"]["kernel"]))
