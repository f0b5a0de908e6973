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

:func:`public_set_method` is the round skeleton shared with CoFED
(:mod:`fedjax_sim.algorithms.cofed`): a term on the round's public batch
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

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.checks import concrete
from fedjax_sim.errors import ConfigError
from fedjax_sim.protocol import (FederatedAlgorithm, Pool, client_optimizer, local_train,
                                 masked_cross_entropy)
from fedjax_sim.algorithms import fedmuscle as fm
from fedjax_sim.algorithms.pooled import assign_round_robin
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
# The round skeleton: a term on the round's public batch (FedHeNN, CoFED).
# ---------------------------------------------------------------------------

class PublicTerm(NamedTuple):
  """What a public-batch method adds to FedMuscle's local task fine-tuning.

  Attributes:
    init: ``() -> state``: the method's server-side arrays before any upload.
    upload: ``(model, params, x [B, ...], task int32 []) -> array``: what ONE
      user uploads, computed on the NEXT round's public batch ``x``
      (``model`` is the user's :class:`~fedjax_sim.algorithms.fedmuscle.UserModel`).
    aggregate: ``(state, uploads [C, ...], uploaded bool [C]) -> state``: the
      server's step on every user's upload (users that did not upload are
      masked out).
    value: ``(model, params, x [B, ...], task int32 [], user int32 [], state)
      -> []``: the term on this round's public batch ``x`` (logged unweighted
      as ``align_loss``).
    weight: ``round int32 [] -> []``: its weight in the local objective.
    upload_shape: ``(shape, dtype)`` of one upload.
  """
  init: Callable[[], Any]
  upload: Callable[..., jax.Array]
  aggregate: Callable[..., Any]
  value: Callable[..., jax.Array]
  weight: Callable[[jax.Array], jax.Array]
  upload_shape: tuple


class PublicServerState(NamedTuple):
  """Server state of a :func:`public_set_method`.

  Attributes:
    term: the method's arrays (FedHeNN: Kbar float32 [B, B]; CoFED: pseudo
      labels int32 [C, B]), computed on the public batch of round ``ready_round``.
    ready_round: int32 []: the round whose public batch ``term`` refers to
      (-1: none yet); the term is used only in that round.
    round: int32 []: rounds completed.
    key: uint32 [2]: the run's key (public batches, shuffles), as FedMuscle's.
  """
  term: Any
  ready_round: jax.Array
  round: jax.Array
  key: jax.Array


def public_set_method(name: str, term: PublicTerm, archs: Sequence[str], tasks: np.ndarray,
                      public_x: jax.Array, *, input_shape: tuple, task_classes: Sequence[int],
                      public_batch: int, proj_dim: int, client_lr: float, batch_size: int,
                      epochs: int = 1, local_steps: int = 0, client_momentum: float = 0.0,
                      lr_decay: float = 1.0, client_ids: Optional[Sequence[np.ndarray]] = None,
                      local_baseline: bool = False) -> FederatedAlgorithm:
  """A pooled multi-task algorithm whose users add ``term`` to their local fine-tuning.

  Per round t and user j (all users join every round):

  1. local fine-tuning of the whole model on its own task (E epochs of
     minibatch SGD, FedMuscle's optimizer and keys), each step's loss
     CE + [t == ready_round] * weight(t) * value(W; X_t);
  2. upload ``term.upload`` of the trained model on X_(t+1);
  3. the server aggregates every upload into the term's state for round t+1.

  Args:
    name: the algorithm's name.
    term: the method (:class:`PublicTerm`).
    archs, tasks, public_x, input_shape, task_classes, client_ids,
      local_baseline: as :func:`~fedjax_sim.algorithms.fedmuscle.fedmuscle`.
    public_batch: B, public examples per round (FedMuscle's public-batch stream).
    proj_dim: d.
    client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay:
      local task fine-tuning.

  Returns:
    A FederatedAlgorithm with one pool per architecture, personalized, with
    FedMuscle's ``evaluate`` hook (``delta_pct`` with ``local_baseline``).

  Raises:
    ValueError: repeated architectures, or a public batch larger than the public set.
  """
  tasks = np.asarray(tasks, np.int32)
  num_users = len(tasks)
  if len(set(archs)) != len(archs):
    raise ValueError(f"architectures {list(archs)} repeat; list each MODEL_ZOO name once.")
  num_public = int(public_x.shape[0])
  if public_batch > num_public:
    raise ValueError(f"public_batch={public_batch} > {num_public} public examples; lower "
                     f"--config.{name}.public_batch or raise --config.data.public_per_class.")
  ids = list(client_ids) if client_ids is not None else assign_round_robin(num_users, len(archs))
  public_x = jnp.asarray(public_x)
  task_of = jnp.asarray(tasks)
  num_classes = int(max(task_classes))
  bias_table = jnp.asarray(fm.task_bias(task_classes, num_classes))
  decay = not (concrete(lr_decay) and lr_decay == 1.0)
  batch_at = lambda key, r: public_x[fm.public_batch_indices(key, r, num_public, public_batch)]

  def make_pool(arch, members):
    um = fm.user_model(arch, tuple(input_shape), proj_dim, num_classes)

    def ce_loss(p, x, y, m, task):
      return masked_cross_entropy(um.logits(p, x) + bias_table[task], y, m)

    def client_update(server, cstate, data, rng, info):
      del rng  # the run key lives in the server state (seeds share one program)
      me = info.client_id
      task = task_of[me]
      key = jax.random.fold_in(jax.random.fold_in(server.key, server.round), me)
      _, k_ft = jax.random.split(key)  # FedMuscle's split: the same fine-tuning shuffles
      x_pub = batch_at(server.key, server.round)
      active = server.ready_round == server.round
      w = jnp.where(active, term.weight(server.round), 0.0)
      value = lambda p: term.value(um, p, x_pub, task, me, server.term)

      def loss(p, x, y, m, r):
        return ce_loss(p, x, y, m, task) + w * value(p)

      opt = (client_optimizer(client_lr, client_momentum, lr_decay, server.round) if decay
             else client_optimizer(client_lr, client_momentum))
      train = lambda p, fn: local_train(fn, p, opt, data, k_ft, epochs=epochs,
                                        batch_size=batch_size, local_steps=local_steps)
      res = train(cstate.params, loss)
      params = res.params
      upload = term.upload(um, params, batch_at(server.key, server.round + 1), task)
      metrics = {**res.metrics, "align_loss": jnp.where(active, value(params), 0.0),
                 "aligned": active.astype(jnp.float32)}
      local = None
      if local_baseline:  # FedMuscle's `local` method's model: plain fine-tuning, same key
        res_local = train(cstate.local, lambda p, x, y, m, r: ce_loss(p, x, y, m, task))
        local = res_local.params
        metrics["local_loss"] = res_local.metrics["loss"]
      return upload, fm.MuscleClientState(params, task, local), metrics

    def init_client(rng):
      params = um.init(rng)
      return fm.MuscleClientState(params, jnp.int32(0), params if local_baseline else None)

    return Pool(
        name=arch, client_ids=np.asarray(members, np.int32), clients_per_round=len(members),
        client_update=client_update, init_client=init_client,
        eval_params=lambda s, c: {"model": c.params, "bias": bias_table[c.task]},
        apply_fn=lambda p, x: um.logits(p["model"], x) + p["bias"])

  pools = tuple(make_pool(a, m) for a, m in zip(archs, ids))
  shape, dtype = term.upload_shape

  def init(rng):
    return PublicServerState(term=term.init(), ready_round=jnp.int32(-1), round=jnp.int32(0),
                             key=rng)

  def server_update(state, uploads, weights, infos, rng):
    """Every user's upload into [C, ...] (padding slots dropped), then the method's step."""
    del weights, rng
    full = jnp.zeros((num_users, *shape), dtype)
    uploaded = jnp.zeros((num_users,), bool)
    for up, info in zip(uploads, infos):
      idx = jnp.where(info.valid, info.client_ids, num_users)  # padding -> dropped
      full = full.at[idx].set(up.astype(dtype), mode="drop")
      uploaded = uploaded.at[idx].set(True, mode="drop")
    any_up = jnp.any(uploaded)
    new_term = jax.tree.map(lambda a, b: jnp.where(any_up, a, b),
                            term.aggregate(state.term, full, uploaded), state.term)
    new = PublicServerState(term=new_term,
                            ready_round=jnp.where(any_up, state.round + 1, state.ready_round),
                            round=state.round + 1, key=state.key)
    return new, {"uploaded_users": jnp.sum(uploaded).astype(jnp.float32)}

  alg = FederatedAlgorithm(
      name=name, init=init, init_client=None, client_update=None, server_update=server_update,
      eval_params=None, apply_fn=None, personalized=True, pools=pools)
  return alg._replace(evaluate=fm.make_user_evaluate(alg, tasks, local_baseline))


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


def multitask_aux(ctx, name: str, keys: Sequence[str] = ("public_x", "tasks",
                                                         "task_classes")) -> dict:
  """``ctx.data.aux`` of a multi-task run (dataset ``digits_multitask``).

  Raises:
    ConfigError: the data lack one of ``keys``.
  """
  aux = getattr(ctx.data, "aux", None) or {}
  missing = [k for k in keys if k not in aux]
  if missing:
    raise ConfigError(f"{name} needs multi-task users and a public set (data aux "
                      f"{', '.join(missing)}); set --config.data.dataset=digits_multitask.")
  return aux


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
