"""A round skeleton for multi-task methods that add a term on a shared public batch.

Used by FedHeNN (:mod:`fedjax_sim.algorithms.fedhenn`, arXiv 2202.07757) and
CoFED (:mod:`fedjax_sim.algorithms.cofed`, arXiv 2202.08603), the two
baselines of FedMuscle (arXiv 2602.01626) that align users through a public
set. Per round t and user j (all users join every round): local fine-tuning of
the whole model on its own task with the term on the round's public batch X_t
added to each step's loss, then an upload computed on the NEXT round's public
batch X_(t+1), which the server aggregates into the term's state for round
t+1. Local task fine-tuning, the per-user model (encoder -> Dense(d)
projection -> task head), the task bias, the run key in the server state
(seeds share one program), the public-batch stream and the ``local_baseline``
shadow model behind ``delta_pct`` are FedMuscle's, with the same keys: with the
term's weight 0, the user models are exactly those of FedMuscle's ``local``
method (``tests/test_fedhenn.py``).

Axis legend: C users (clients), B public batch, d representation dimension,
T tasks, L classes.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.checks import concrete
from fedjax_sim.errors import ConfigError
from fedjax_sim.protocol import (FederatedAlgorithm, client_optimizer, local_train,
                                 masked_cross_entropy)
from fedjax_sim.algorithms import fedmuscle as fm
from fedjax_sim.algorithms.pooled import assign_round_robin

__all__ = ["PublicServerState", "PublicTerm", "multitask_aux", "public_set_method"]


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

    return fm.user_pool(arch, members, um, bias_table, client_update, local_baseline)

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
