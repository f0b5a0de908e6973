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


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN, "resnet": ResNet}


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
