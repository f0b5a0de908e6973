"""FedHeNN: a CKA proximal term on the representations of a public batch (FedMuscle's baseline).

Paper: Makhija, Han, Ho, Ghosh, "Architecture Agnostic Federated Learning for
Neural Networks", ICML 2022, arXiv 2202.07757. FedMuscle (arXiv 2602.01626)
compares against it in its multi-task setting; we run it there, on the same
users, models, tasks and public set as :mod:`fedjax_sim.algorithms.fedmuscle`
(dataset ``digits_multitask``; our reading: ``docs/decisions.md#fedhenn``).

User j keeps its own model W_j (any architecture). In round t it trains on

  f_j(W_j) + eta_t * d(K_j(W_j; X_t), Kbar_t)

where X_t is the round's public batch (B examples, no labels),
K_j(W; X) = Z Z^T is the B x B representation kernel of Z = phi(W; X)
float32 [B, d], the user model's penultimate representation (the head's input:
``UserModel.represent``, the encoder's embedding projected to d), and the
global representation matrix Kbar_t = (1/N) sum_j K_j(W_j^(t-1); X_t) is the
uniform mean of every user's kernel of its model after round t-1 on the same
batch. The distance is the linear-kernel CKA distance (Kornblith et al.,
arXiv 1905.00414, Eq. 3-4, with centering H = I - 11^T/B):

  HSIC(K, L) = tr(K H L H) / (B - 1)^2
  CKA(K, L)  = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))
  d(K, L)    = 1 - CKA(K, L)

and the proximal weight grows linearly with the round, eta_t = eta * t
(``eta_schedule='linear'``; ``'constant'``: eta_t = eta). Each of the user's
local minibatch steps adds the term (the public batch is the same within a
round), so the term is part of the local objective, not a separate phase.

Sources (``docs/decisions.md#fedhenn``): the paper's abstract and FedMuscle's
description give the structure (a proximal term on the representations of a
shared set of instances, the CKA distance to a server-side global
representation matrix). The paper's own equations were not available to us;
the details follow the public reimplementation in the FederatedScope
model-heterogeneity benchmark (github.com/zza234s/MHFL,
``FedHeNN_worker.py``, ``FedHeNN_CV_trainer.py``): kernels Z Z^T of the
penultimate representation, Kbar the mean of all clients' kernels (w_j = 1/N),
recomputed each round from the previous round's models on a fresh instance
set, weight eta * round. Where we differ from that code: [ours] d = 1 - CKA
(the code adds +CKA, a similarity, which pushes representations apart), CKA of
the kernels themselves (the code's ``linear_CKA(K, Kbar)`` forms K K^T again,
a kernel of the kernels), and the instance set X_t is FedMuscle's public batch
(the code, after the paper by its comment, draws one training example per
client each round; FedMuscle's setting has a public set instead).

How it fits one jitted round [ours] (the same idea as FedMuscle's): the engine
runs one client phase, then one server phase. At the end of round t-1 each
user uploads K_j of its trained model on the NEXT round's public batch X_t
(a pure function of (run key, t)); the server averages the uploads into Kbar_t
and stores it; in round t every user trains against it on X_t. Nothing moves
a user's model between its upload and the next round, so this is the order
of the code above (the server computes Kbar from the models of round t-1, the
users train against it in round t). Round 0 has no Kbar (and eta_0 = 0 anyway
under the linear schedule).

The round skeleton, shared with CoFED (:mod:`fedjax_sim.algorithms.cofed`), is
:func:`fedjax_sim.algorithms.public_set.public_set_method`: a term on the round's public batch
added to each local step, built from what every user uploaded on that batch at
the end of the previous round. Local task fine-tuning, the per-user model
(encoder -> Dense(d) projection -> task head), the task bias, the run key in
the server state (seeds share one program), the public-batch stream and the
``local_baseline`` shadow model behind ``delta_pct`` are FedMuscle's, with
the same keys: with the term's weight 0, the user models are exactly those of
FedMuscle's ``local`` method (tested).

Axis legend: C users (clients), K cohort, N examples, B public batch, d
representation dimension, T tasks, L classes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.checks import concrete
from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.algorithms.public_set import (PublicServerState, PublicTerm, multitask_aux,
                                              public_set_method)
from fedjax_sim.algorithms.registry import register

__all__ = ["ETA_SCHEDULES", "PublicServerState", "PublicTerm", "cka", "cka_distance", "fedhenn",
           "global_kernel", "hsic", "public_set_method", "representation_kernel"]

ETA_SCHEDULES = ("linear", "constant")


# ---------------------------------------------------------------------------
# Linear CKA on kernels.
# ---------------------------------------------------------------------------

def representation_kernel(z: jax.Array) -> jax.Array:
  """K = Z Z^T, float32 [B, B], of representations z float32 [B, d] (the linear kernel)."""
  return z @ z.T


def _centered(k: jax.Array) -> jax.Array:
  """H K H for H = I - 11^T/B: K minus its row and column means plus its grand mean."""
  return k - jnp.mean(k, axis=0, keepdims=True) - jnp.mean(k, axis=1, keepdims=True) + jnp.mean(k)


def hsic(k: jax.Array, l: jax.Array) -> jax.Array:
  """HSIC(K, L) = tr(K H L H) / (B - 1)^2 for kernels float32 [B, B] (arXiv 1905.00414, Eq. 3).

  tr(K H L H) = <H K H, H L H>_F because H is symmetric and idempotent.
  """
  n = k.shape[0]
  return jnp.sum(_centered(k) * _centered(l)) / (n - 1) ** 2


def cka(k: jax.Array, l: jax.Array) -> jax.Array:
  """CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) in [0, 1] (arXiv 1905.00414, Eq. 4).

  Args: k, l float32 [B, B], symmetric kernels. With k = X X^T, l = Y Y^T this is
  the linear CKA ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) of the
  column-centered features. A constant kernel (zero after centering) gives 0,
  with a zero gradient, instead of 0/0.
  """
  den = hsic(k, k) * hsic(l, l)
  ok = den > 0
  return jnp.where(ok, hsic(k, l) / jnp.sqrt(jnp.where(ok, den, 1.0)), 0.0)


def cka_distance(k: jax.Array, l: jax.Array) -> jax.Array:
  """d(K, L) = 1 - CKA(K, L): FedHeNN's proximal distance (0 for kernels equal up to scale)."""
  return 1.0 - cka(k, l)


def global_kernel(kernels: jax.Array, uploaded: jax.Array) -> jax.Array:
  """Kbar = uniform mean of the uploaded kernels: float32 [B, B].

  Args: kernels float32 [C, B, B]; uploaded bool [C] (rows of users who did not
  upload are ignored; none uploaded gives zeros).
  """
  w = uploaded.astype(kernels.dtype)
  return jnp.einsum("c,cij->ij", w, kernels) / jnp.maximum(jnp.sum(w), 1.0)


# ---------------------------------------------------------------------------
# FedHeNN.
# ---------------------------------------------------------------------------

def fedhenn_term(public_batch: int, eta: float = 0.01, eta_schedule: str = "linear") -> PublicTerm:
  """FedHeNN's term: eta_t * (1 - CKA(K_j(W; X_t), Kbar_t)), Kbar_t the mean uploaded kernel."""
  b = public_batch

  def upload(um, params, x, task):
    del task
    return representation_kernel(um.represent(params, x))

  def value(um, params, x, task, me, kbar):
    del task, me
    return cka_distance(representation_kernel(um.represent(params, x)), kbar)

  def weight(round_):
    if eta_schedule == "linear":
      return eta * round_.astype(jnp.float32)
    return jnp.asarray(eta, jnp.float32)

  return PublicTerm(init=lambda: jnp.zeros((b, b), jnp.float32), upload=upload,
                    aggregate=lambda kbar, kernels, uploaded: global_kernel(kernels, uploaded),
                    value=value, weight=weight, upload_shape=((b, b), jnp.float32))


def fedhenn(archs: Sequence[str], tasks: np.ndarray, public_x: jax.Array, *,
            input_shape: tuple, task_classes: Sequence[int], eta: float = 0.01,
            eta_schedule: str = "linear", public_batch: int = 32, proj_dim: int = 32,
            client_lr: float, batch_size: int, epochs: int = 1, local_steps: int = 0,
            client_momentum: float = 0.0, lr_decay: float = 1.0,
            client_ids: Optional[Sequence[np.ndarray]] = None,
            local_baseline: bool = False) -> FederatedAlgorithm:
  """FedHeNN (arXiv 2202.07757) on FedMuscle's multi-task users, as a pooled FederatedAlgorithm.

  Args:
    archs: distinct MODEL_ZOO names, one pool each (users round-robin).
    tasks: int [C] (host), task id per user.
    public_x: float32 [N_pub, ...], the public split (unlabeled).
    input_shape: shape of one example.
    task_classes: int [T], classes per task (FedMuscle's masked 10-wide head).
    eta: the proximal weight eta (its value at round 1 under the linear schedule).
    eta_schedule: ``'linear'`` (eta_t = eta * t) or ``'constant'`` (eta_t = eta).
    public_batch: B, public examples per round (the kernels are B x B).
    proj_dim: d, the representation's dimension (the head's input).
    client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay:
      local task fine-tuning.
    client_ids: optional explicit user-to-pool assignment.
    local_baseline: also train every user's local-training shadow model and
      report ``delta_pct`` (FedMuscle's ``evaluate`` hook).

  Returns:
    A FederatedAlgorithm (:func:`public_set_method`), server term Kbar float32 [B, B].

  Raises:
    ValueError: eta < 0, an unknown schedule, repeated architectures, or a
      public batch larger than the public set (or smaller than 2).
  """
  if concrete(eta) and eta < 0:
    raise ValueError(f"fedhenn.eta={eta} must be >= 0; set --config.fedhenn.eta.")
  if eta_schedule not in ETA_SCHEDULES:
    raise ValueError(f"fedhenn.eta_schedule='{eta_schedule}' unknown; use one of "
                     f"{ETA_SCHEDULES} (--config.fedhenn.eta_schedule).")
  if public_batch < 2:
    raise ValueError(f"fedhenn.public_batch={public_batch}: CKA needs B >= 2 public examples; "
                     "set --config.fedhenn.public_batch.")
  return public_set_method(
      "fedhenn", fedhenn_term(public_batch, eta, eta_schedule), archs, tasks, public_x,
      input_shape=input_shape, task_classes=task_classes, public_batch=public_batch,
      proj_dim=proj_dim, client_lr=client_lr, batch_size=batch_size, epochs=epochs,
      local_steps=local_steps, client_momentum=client_momentum, lr_decay=lr_decay,
      client_ids=client_ids, local_baseline=local_baseline)


@register("fedhenn", fedhenn, pooled=True, fixed=("client_ids", "local_baseline"))
def _build(ctx, **knobs):
  """FedHeNN from a run config: pools ``--config.archs``, knobs ``--config.fedhenn.<knob>``, the
  users' tasks and public set from the data (dataset ``digits_multitask``), the local-training
  shadow trained alongside so every evaluation row has ``delta_pct``.

  Raises:
    ConfigError: the data have no public set or no per-user tasks.
  """
  aux = multitask_aux(ctx, "fedhenn")
  return fedhenn(ctx.archs, aux["tasks"], aux["public_x"], input_shape=ctx.spec.input_shape,
                 task_classes=aux["task_classes"], local_baseline=True, **ctx.client, **knobs)
