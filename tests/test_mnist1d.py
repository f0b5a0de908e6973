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
