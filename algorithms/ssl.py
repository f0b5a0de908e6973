"""Federated self-supervised learning bases: FedAlignUniform and FedSimCLR.

These are the bases of SSD (Fang et al., "Soft Separation and Distillation:
Toward Global Uniformity in Federated Unsupervised Learning", ICCV 2025,
arXiv 2508.01251; official code github.com/hc-fang/ssd). ``docs/decisions.md#ssd``
records what we take from the paper and the code:

* Model: encoder f (the representation kept for downstream use) followed by a
  projector g; z = g(f(x)) is L2-normalized onto the unit sphere before the
  SSL loss. [code] Our encoders are small (digits are 8x8x1): an MLP or a
  small CNN whose D-dimensional output passes a final ReLU (non-negative like
  a ResNet's pooled features), and a projector D -> hidden -> LayerNorm ->
  ReLU -> D (the code's ResNet-18 projector is 512-2048-BN-ReLU-512; we use
  LayerNorm, not BatchNorm, because batch statistics are ill-defined across
  non-IID clients). [ours] The projector's output dim equals the encoder's,
  as projector distillation (SSD's PD) needs.
* FedAlignUniform loss [code]: L = L_align(z1, z2) + beta * (L_uniform(z1) +
  L_uniform(z2)) / 2 with Wang & Isola's (ICML 2020, arXiv 2005.10242)
  L_align = E ||z - z+||^2 and L_uniform = log E_{i != j} exp(-t ||z_i -
  z_j||^2), t = 2, beta = 1.
* FedSimCLR loss: NT-Xent (Chen et al. 2020, arXiv 2002.05709, Eq. 1) over the
  2B views, temperature tau (0.5 default, SimCLR's CIFAR value). [ours]
* Two augmented views per example, drawn inside the jitted round by
  :mod:`fedjax_sim.augment` from the per-step key ``local_train`` hands the
  loss. Labels are never read in training.
* Local optimizer [code]: SGD with momentum 0.9, weight decay 1e-4, a fresh
  optimizer each round, learning rate on a cosine schedule over rounds
  (lr_r = lr * (1 + cos(pi r / R)) / 2). Aggregation: FedAvg, the
  example-weighted mean of the clients' models (encoder and projector).
* Padded batch rows (mask False) are excluded from every term: alignment and
  PD average over real rows, uniformity over pairs of distinct real rows,
  NT-Xent drops padded rows from anchors and negatives.

Axis legend: C clients, K cohort, N examples per client, B batch,
D embedding (encoder and projector output).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_sim.protocol import FederatedAlgorithm, local_train, tree_weighted_mean
from fedjax_sim.metrics import l2_normalize
from fedjax_sim.augment import AugmentConfig, two_views
from fedjax_sim.repr_metrics import alignment, uniformity

# ----------------------------------------------------------------------------- models


class Encoder(nn.Module):
  """x [B, H, W, Ch] -> h float32 [B, D] (non-negative: final ReLU).

  kind "mlp": flatten - Dense(hidden) ReLU ... - Dense(D) ReLU.
  kind "cnn": Conv3x3(32) ReLU - Conv3x3(64, stride 2) ReLU - flatten - Dense(D) ReLU.
  """
  dim: int = 128
  kind: str = "mlp"
  hidden: Sequence[int] = (256,)

  @nn.compact
  def __call__(self, x):
    if self.kind == "mlp":
      z = x.reshape((x.shape[0], -1))
      for h in self.hidden:
        z = nn.relu(nn.Dense(h)(z))
    elif self.kind == "cnn":
      z = nn.relu(nn.Conv(32, (3, 3), padding="SAME")(x))
      z = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), padding="SAME")(z))
      z = z.reshape((z.shape[0], -1))
    else:
      raise ValueError(f"unknown encoder kind '{self.kind}'; set "
                       "--config.<algorithm>.encoder_kind to mlp or cnn.")
    return nn.relu(nn.Dense(self.dim)(z))


class Projector(nn.Module):
  """h [B, D] -> z float32 [B, D] (raw, not normalized): Dense-LayerNorm-ReLU-Dense."""
  dim: int = 128
  hidden: int = 256

  @nn.compact
  def __call__(self, h):
    return nn.Dense(self.dim)(nn.relu(nn.LayerNorm()(nn.Dense(self.hidden)(h))))


class SSLModel(nn.Module):
  """Encoder + projector. ``__call__(x [B, ...]) -> (h [B, D], z [B, D])`` (both raw)."""
  dim: int = 128
  encoder_kind: str = "mlp"
  encoder_hidden: Sequence[int] = (256,)
  projector_hidden: int = 256

  def setup(self):
    self.encoder = Encoder(self.dim, self.encoder_kind, tuple(self.encoder_hidden))
    self.projector = Projector(self.dim, self.projector_hidden)

  def __call__(self, x):
    h = self.encoder(x)
    return h, self.projector(h)

  def encode(self, x):
    return self.encoder(x)


def init_model_params(model: SSLModel, rng: jax.Array, input_shape: Sequence[int]) -> Any:
  """Parameters ``{'encoder': ..., 'projector': ...}`` from one dummy example."""
  return model.init(rng, jnp.zeros((1, *input_shape), jnp.float32))["params"]


# ----------------------------------------------------------------------------- losses


def _count(mask: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def align_uniform_loss(z1: jax.Array, z2: jax.Array, mask: Optional[jax.Array] = None, *,
                       beta: float = 1.0, t: float = 2.0) -> jax.Array:
  """FedAlignUniform's local loss: L_align + beta (L_uniform(z1) + L_uniform(z2)) / 2.

  Args: z1, z2 float32 [B, D], already L2-normalized projector outputs; mask bool [B].
  """
  return alignment(z1, z2, mask) + beta * 0.5 * (uniformity(z1, mask, t) + uniformity(z2, mask, t))


def nt_xent_masked(z1: jax.Array, z2: jax.Array, tau: float,
                   mask: Optional[jax.Array] = None) -> jax.Array:
  """NT-Xent over the 2B views with padded rows removed from anchors and negatives.

  With every row real it equals :func:`fedjax_sim.algorithms.losses.nt_xent`.

  Args: z1, z2 float32 [B, D] (normalized inside); tau > 0; mask bool [B] or None.
  """
  b = z1.shape[0]
  mask = jnp.ones((b,), bool) if mask is None else mask
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0))
  m2 = jnp.concatenate([mask, mask])
  sim = z @ z.T / tau
  sim = jnp.where(jnp.eye(2 * b, dtype=bool) | ~m2[None, :], -1e30, sim)
  targets = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(0, b)])
  ce = optax.softmax_cross_entropy_with_integer_labels(sim, targets)
  return jnp.sum(jnp.where(m2, ce, 0.0)) / _count(m2)


# ----------------------------------------------------------------------------- algorithm


class ServerState(NamedTuple):
  """The server's state.

  Attributes:
    params: {'encoder': ..., 'projector': ...}, the global model.
    round: int32 []: rounds aggregated so far.
    coef: dict of float32 [] loss weights (``beta``, ``gamma``, ``delta``; unused
      ones are ignored). Arrays, not Python floats, so ablations that only change
      a weight (SSD, SSD without PD, without DSR, FedAlignUniform) reuse one
      compiled round: replace ``coef`` in the initial state.
    salt: int32 []: drawn from the init key; folded into every client key, so
      runs with different seeds draw different augmentations even when they
      share one compiled round (whose ``make_round`` seed is fixed).
  """
  params: Any
  round: jax.Array
  coef: dict
  salt: jax.Array


# loss(h1, h2, z1, z2, mask, client_id, coef) -> scalar; h, z raw [B, D]; mask bool [B];
# client_id int32 []; coef dict of float32 [] (ServerState.coef).
SSLLoss = Callable[..., jax.Array]


def cosine_lr(lr: float, round: jax.Array, rounds: int) -> jax.Array:
  """lr * (1 + cos(pi r / R)) / 2 for round r of R (the official code's schedule)."""
  frac = jnp.minimum(round.astype(jnp.float32) / max(rounds, 1), 1.0)
  return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))


def fed_ssl(model: SSLModel, input_shape: Sequence[int], loss: SSLLoss, *, rounds: int,
            coef: Optional[dict] = None, client_lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
            batch_size: int = 32, epochs: int = 1, local_steps: int = 0,
            cosine: bool = True, augment: AugmentConfig = AugmentConfig(),
            name: str = "fed_ssl") -> FederatedAlgorithm:
  """A federated SSL method: two views, local SGD on ``loss``, FedAvg aggregation.

  Args:
    model: the encoder + projector.
    input_shape: one example's shape, e.g. (8, 8, 1).
    loss: ``(h1, h2, z1, z2, mask, client_id, coef) -> scalar``: encoder
      outputs h float32 [B, D] and raw projector outputs z float32 [B, D] of
      the two views, mask bool [B], client id int32 [], coef the server
      state's dict of float32 [] loss weights.
    rounds: R, for the cosine schedule.
    coef: initial loss weights, e.g. {'beta': 1.0} (stored as float32 arrays).
    client_lr, momentum, weight_decay: local SGD.
    batch_size: B.  epochs: E.  local_steps: fixed steps instead of epochs (> 0).
    cosine: cosine-decay the client lr over rounds (else constant).
    augment: view augmentations.

  ``apply_fn(params, x [B, ...])`` returns the ENCODER features h [B, D], not
  logits: the engine's classification evaluation does not apply to these
  methods (use :mod:`fedjax_sim.repr_metrics`).
  """
  input_shape = tuple(input_shape)
  coef0 = {k: float(v) for k, v in (coef or {}).items()}

  def init(rng):
    k_params, k_salt = jax.random.split(rng)
    salt = jax.random.randint(k_salt, (), 0, jnp.iinfo(jnp.int32).max, dtype=jnp.int32)
    return ServerState(init_model_params(model, k_params, input_shape), jnp.int32(0),
                       {k: jnp.float32(v) for k, v in coef0.items()}, salt)

  def client_update(server_state, client_state, data, rng, info):
    g = server_state.params
    rng = jax.random.fold_in(rng, server_state.salt)
    lr = cosine_lr(client_lr, info.round, rounds) if cosine else client_lr
    opt = optax.chain(optax.add_decayed_weights(weight_decay),
                      optax.sgd(lr, momentum=momentum or None))

    def loss_fn(p, x, y, mask, key):
      del y  # self-supervised: labels are never read
      x1, x2 = two_views(key, x, augment)
      h, z = model.apply({"params": p}, jnp.concatenate([x1, x2], axis=0))
      b = x.shape[0]
      return loss(h[:b], h[b:], z[:b], z[b:], mask, info.client_id, server_state.coef)

    res = local_train(loss_fn, g, opt, data, rng, epochs=epochs, batch_size=batch_size,
                      local_steps=local_steps)
    delta = jax.tree.map(lambda a, b: a - b, g, res.params)
    return delta, client_state, res.metrics

  def server_update(server_state, uploads, weights, info, rng):
    del info, rng
    delta = tree_weighted_mean(uploads, weights)
    params = jax.tree.map(lambda p, d: p - d, server_state.params, delta)
    new = server_state._replace(params=params, round=server_state.round + 1)
    return new, {"update_norm": optax.global_norm(delta)}

  def apply_fn(params, x):
    return model.apply({"params": params}, x, method=SSLModel.encode)

  eval_cache = {}

  def evaluate(server_state, client_states, data):
    """Representation metrics of the global encoder (fedjax_sim.repr_metrics)."""
    from fedjax_sim.repr_metrics import make_repr_eval
    if "fn" not in eval_cache:  # built once per run (it closes over the data)
      eval_cache["fn"] = make_repr_eval(
          lambda p, x: model.apply({"params": p}, x), data.train, data.test_x, data.test_y,
          num_classes=data.num_classes)
    return eval_cache["fn"](server_state.params, jax.random.PRNGKey(0))

  return FederatedAlgorithm(
      name=name, init=init, init_client=lambda rng: (), client_update=client_update,
      server_update=server_update, eval_params=lambda s, c: s.params, apply_fn=apply_fn,
      evaluate=evaluate)


def alignuniform_objective(t: float = 2.0) -> SSLLoss:
  """FedAlignUniform's loss as an :data:`SSLLoss` (normalizes z inside; weight coef['beta'])."""
  def loss(h1, h2, z1, z2, mask, client_id, coef):
    del h1, h2, client_id
    return align_uniform_loss(l2_normalize(z1), l2_normalize(z2), mask, beta=coef["beta"], t=t)
  return loss


def simclr_objective(tau: float = 0.5) -> SSLLoss:
  """FedSimCLR's loss (masked NT-Xent) as an :data:`SSLLoss`."""
  def loss(h1, h2, z1, z2, mask, client_id, coef):
    del h1, h2, client_id, coef
    return nt_xent_masked(z1, z2, tau, mask)
  return loss


def fedalignuniform(model: SSLModel, input_shape, *, beta: float = 1.0, t: float = 2.0,
                    **kwargs) -> FederatedAlgorithm:
  """FedAlignUniform (SSD's base): :func:`fed_ssl` with the alignment + uniformity loss."""
  return fed_ssl(model, input_shape, alignuniform_objective(t), coef={"beta": beta},
                 name=kwargs.pop("name", "fedalignuniform"), **kwargs)


def fedsimclr(model: SSLModel, input_shape, *, tau: float = 0.5, **kwargs) -> FederatedAlgorithm:
  """FedSimCLR: :func:`fed_ssl` with NT-Xent at temperature tau."""
  return fed_ssl(model, input_shape, simclr_objective(tau),
                 name=kwargs.pop("name", "fedsimclr"), **kwargs)
