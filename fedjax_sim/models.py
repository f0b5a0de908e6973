"""Client models as Flax Linen modules whose parameters are plain pytrees.

Every model maps a batch x [B, *input_shape] to logits [B, num_classes]; with
``return_embedding=True`` it also returns the penultimate embedding [B, D] (used
by representation methods: CoRe-Fed, FedRE, FedProto, ...).
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim.text import CharGRU


class MLP(nn.Module):
  """Fully connected ReLU network (FedAvg paper's 2NN is hidden=(200, 200))."""
  num_classes: int
  hidden: Sequence[int] = (200, 200)

  @nn.compact
  def __call__(self, x, return_embedding: bool = False):
    z = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      z = nn.relu(nn.Dense(h)(z))
    logits = nn.Dense(self.num_classes)(z)
    return (logits, z) if return_embedding else logits


class CNN(nn.Module):
  """The FedAvg-paper CNN (McMahan et al. 2017, arXiv 1602.05629, Sec. 3).

  conv5x5(32)-pool-conv5x5(64)-pool-FC(512)-logits; ``features`` and
  ``dense`` set the widths (CoRe-Fed's CIFAR CNN: features=(64, 64),
  dense=(384, 192)).
  """
  num_classes: int
  features: Sequence[int] = (32, 64)
  dense: Sequence[int] = (512,)

  @nn.compact
  def __call__(self, x, return_embedding: bool = False):
    z = x
    for f in self.features:
      z = nn.relu(nn.Conv(f, (5, 5), padding="SAME")(z))
      z = nn.max_pool(z, (2, 2), strides=(2, 2), padding="SAME")
    z = z.reshape((z.shape[0], -1))
    for h in self.dense:
      z = nn.relu(nn.Dense(h)(z))
    logits = nn.Dense(self.num_classes)(z)
    return (logits, z) if return_embedding else logits


class ResidualBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    # GroupNorm, not BatchNorm: batch statistics are ill-defined across
    # non-IID clients (Hsieh et al. 2020, arXiv 1910.00189).
    groups = min(8, self.features)
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), padding="SAME",
                use_bias=False)(x)
    y = nn.relu(nn.GroupNorm(num_groups=groups)(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
    y = nn.GroupNorm(num_groups=groups)(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(x)
      x = nn.GroupNorm(num_groups=groups)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small GroupNorm ResNet for CIFAR: stem + stages of residual blocks."""
  num_classes: int
  stage_features: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 1

  @nn.compact
  def __call__(self, x, return_embedding: bool = False):
    z = nn.relu(nn.GroupNorm(num_groups=min(8, self.stage_features[0]))(
        nn.Conv(self.stage_features[0], (3, 3), padding="SAME", use_bias=False)(x)))
    for i, f in enumerate(self.stage_features):
      for b in range(self.blocks_per_stage):
        z = ResidualBlock(f, strides=2 if (i > 0 and b == 0) else 1)(z)
    z = jnp.mean(z, axis=(1, 2))
    logits = nn.Dense(self.num_classes)(z)
    return (logits, z) if return_embedding else logits


def _as_signal(x: jax.Array) -> jax.Array:
  """x [B, ...] -> [B, L, 1]: every non-batch axis flattened into one 1-channel signal."""
  return x.reshape((x.shape[0], -1, 1))


class CNN1D(nn.Module):
  """A 1-D CNN over a signal: the MNIST-1D paper's CNN (Greydanus and Kobak, arXiv 2011.14439,
  Sec. 3 and its models.py ``ConvBase``).

  The input x [B, ...] is read as one signal of L = prod(...) steps with one
  channel (MNIST-1D: L = 40). Each layer is a ReLU Conv1d with
  ``features[i]`` channels, kernel ``kernel_sizes[i]``, stride ``stride`` and
  padding 1 (PyTorch's ``padding=1``), so with the defaults the lengths are
  40 -> 19 -> 10 -> 5; then optional ReLU Dense layers ``dense``; the
  embedding is the flattened last hidden layer (D = 25 * 5 = 125 for the
  paper's setting on MNIST-1D) and the classifier one Dense.

  Raises:
    ValueError: ``features`` and ``kernel_sizes`` differ in length.
  """
  num_classes: int
  features: Sequence[int] = (25, 25, 25)
  kernel_sizes: Sequence[int] = (5, 3, 3)
  stride: int = 2
  dense: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, return_embedding: bool = False):
    if len(self.features) != len(self.kernel_sizes):
      raise ValueError(f"cnn1d: features {tuple(self.features)} and kernel_sizes "
                       f"{tuple(self.kernel_sizes)} must have the same length (one kernel per "
                       "conv layer); set --config.model_kwargs.kernel_sizes.")
    z = _as_signal(x)
    for f, k in zip(self.features, self.kernel_sizes):
      z = nn.relu(nn.Conv(f, (k,), strides=(self.stride,), padding=((1, 1),))(z))
    z = z.reshape((z.shape[0], -1))
    for h in self.dense:
      z = nn.relu(nn.Dense(h)(z))
    logits = nn.Dense(self.num_classes)(z)
    return (logits, z) if return_embedding else logits


class GRU(nn.Module):
  """A GRU sequence classifier: the MNIST-1D paper's GRU (arXiv 2011.14439, Sec. 3 and its
  models.py ``GRUBase``: bidirectional, hidden size 6).

  The input x [B, ...] is read as a sequence of T = prod(...) steps with one
  feature each (MNIST-1D: T = 40). A GRU with ``hidden_size`` units runs over
  it (``directions=2``: forward and backward, outputs concatenated to
  [B, T, 2 * hidden_size]); the outputs at every step, flattened, are the
  embedding (D = T * directions * hidden_size = 480 for the paper's setting)
  and one Dense is the classifier. Cell: ``flax.linen.GRUCell``, PyTorch's
  ``nn.GRU`` equations with the redundant hidden biases b_hr, b_hz folded
  into b_ir, b_iz (5,110 parameters on MNIST-1D against PyTorch's 5,134).

  Raises:
    ValueError: ``directions`` is not 1 or 2.
  """
  num_classes: int
  hidden_size: int = 6
  directions: int = 2

  @nn.compact
  def __call__(self, x, return_embedding: bool = False):
    if self.directions not in (1, 2):
      raise ValueError(f"gru: directions={self.directions} must be 1 (forward) or 2 "
                       "(bidirectional); set --config.model_kwargs.directions.")
    z = _as_signal(x)
    forward = nn.RNN(nn.GRUCell(self.hidden_size))
    if self.directions == 2:
      z = nn.Bidirectional(forward, nn.RNN(nn.GRUCell(self.hidden_size)))(z)
    else:
      z = forward(z)
    z = z.reshape((z.shape[0], -1))
    logits = nn.Dense(self.num_classes)(z)
    return (logits, z) if return_embedding else logits


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN, "resnet": ResNet,
                                               "cnn1d": CNN1D, "gru": GRU}
MODELS["char_gru"] = CharGRU  # next-character model (fedjax_sim/text.py)


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Instantiates a model by config name.

  Raises:
    ValueError: unknown name (lists the known ones).
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model '{name}'; set --config.model to one of {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, **kwargs)


def init_params(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]):
  """Initializes parameters from one dummy example; returns a plain dict pytree."""
  variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32))
  return variables["params"]


# A family of architectures for model-heterogeneous FL (pools): different
# depth, width and kind. Every entry returns a 2-D embedding with
# return_embedding=True (dimension D varies by architecture).
MODEL_ZOO: dict[str, tuple[str, dict]] = {
    "mlp_s": ("mlp", {"hidden": (64,)}),
    "mlp_m": ("mlp", {"hidden": (200, 200)}),
    "mlp_l": ("mlp", {"hidden": (512, 256, 128)}),
    "cnn_s": ("cnn", {"features": (16, 32), "dense": (128,)}),
    "cnn_m": ("cnn", {"features": (32, 64), "dense": (512,)}),
    "resnet_s": ("resnet", {"stage_features": (16, 32), "blocks_per_stage": 1}),
    "resnet_m": ("resnet", {"stage_features": (16, 32, 64), "blocks_per_stage": 1}),
    # 1-D signals (MNIST-1D); any input is read as one 1-channel signal.
    "cnn1d_s": ("cnn1d", {"features": (16, 16), "kernel_sizes": (5, 3)}),
    "cnn1d_m": ("cnn1d", {"features": (25, 25, 25), "kernel_sizes": (5, 3, 3)}),
    "gru_s": ("gru", {"hidden_size": 6, "directions": 2}),
}


def build_zoo_model(name: str, num_classes: int) -> nn.Module:
  """Instantiates a :data:`MODEL_ZOO` architecture by name.

  Raises:
    ValueError: unknown name (lists the known ones).
  """
  if name not in MODEL_ZOO:
    raise ValueError(f"Unknown architecture '{name}'; use one of {sorted(MODEL_ZOO)} "
                     "(fedjax_sim.models.MODEL_ZOO).")
  kind, kwargs = MODEL_ZOO[name]
  return build_model(kind, num_classes, **kwargs)
