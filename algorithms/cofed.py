"""CoFED: co-training by pseudo-labels on the public set (FedMuscle's baseline), multi-task users.

Paper: Cao, Li, Sun, Yu, Guizani, "CoFED: Cross-silo heterogeneous federated
multi-task learning via co-training" (arXiv 2202.08603). Participants with
their own models and tasks label an unlabeled public set with their models;
public examples on whose label the participants agree become extra training
data for everyone whose task has that label. FedMuscle (arXiv 2602.01626)
compares against it in its multi-task setting; we run it there, on the same
users, models, tasks and public batches as
:mod:`fedjax_sim.algorithms.fedmuscle` (dataset ``digits_multitask``; our
reading: ``docs/decisions.md#cofed``). Registered as ``cofed_cotrain``:
``cofed`` is CoRe-Fed's Co-Fed ablation (:mod:`fedjax_sim.algorithms.corefed`).

Sources: the paper's abstract (pseudo-labelling unlabeled data "like
co-training", compatible with heterogeneous tasks, models and training) and
FedMuscle's use of it as a baseline on a public set. Neither the paper's
equations nor its code were available to us, and FedMuscle does not spell out
the rule, so the rule below is ours, chosen to be the plain co-training
reading; CoFED itself is described as communication-efficient (few rounds),
where we relabel one public batch per round, the same public stream every
FedMuscle method sees.

Per round t, user u (all users join every round; the skeleton is
:func:`fedjax_sim.algorithms.public_set.public_set_method`):

1. fine-tunes its whole model on its task, each local step's loss
   CE(private batch) + lambda * CE(X_t, yhat_u) over the public examples of
   this round's batch X_t that carry a pseudo label for u (lambda =
   ``pseudo_weight``; none in round 0);
2. uploads its hard predictions on the NEXT round's batch X_(t+1),
   p_u = argmax of its task-masked logits, int32 [B];
3. the server turns every prediction into pseudo labels for round t+1
   (:func:`pseudo_labels`).

The pseudo-labelling rule [ours where the sources are silent]:

* Votes for user u on example b come from the OTHER users v != u (co-training:
  a model is taught by the others, never by itself) whose prediction p_v(b)
  names a class of u's task: v's class c counts as a vote for u's class
  ``votes[task_v, c, task_u]`` (:func:`vote_table`). ``label_rule='same_task'``
  (default, CoFED's notion that two participants share a class only when it is
  the same class): only users of u's own task vote, class for class.
  ``'refines'``: a user also votes when its task determines u's (each of its
  classes lies inside one class of u's: digit10 votes for parity, gt4 and
  mod3 through the task label maps; parity, gt4 and mod3 vote only for their
  own task).
* yhat_u(b) = the class with the most votes (ties: the smallest class id),
  kept when its votes are MORE than ``agreement`` times all votes on b for u
  (default 0.5: a strict majority; 2 voters must agree) and at least one vote
  was cast. Unkept examples carry -1 and are masked out of the loss.

Axis legend: C users (clients), B public batch, T tasks, L classes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.checks import concrete
from fedjax_sim.protocol import FederatedAlgorithm, masked_cross_entropy
from fedjax_sim.algorithms import fedmuscle as fm
from fedjax_sim.algorithms.public_set import PublicTerm, multitask_aux, public_set_method
from fedjax_sim.algorithms.registry import register

__all__ = ["LABEL_RULES", "cofed_cotrain", "pseudo_labels", "vote_table"]

LABEL_RULES = ("same_task", "refines")


def vote_table(label_map: Optional[np.ndarray], task_classes: Sequence[int],
               rule: str = "same_task") -> np.ndarray:
  """How a prediction of one task votes for another task's class: int32 [T, L, T].

  ``out[s, c, t]`` is the class of task t that task s's class c votes for, or
  -1 (no vote). ``'same_task'``: ``out[t, c, t] = c``, nothing across tasks.
  ``'refines'``: also ``out[s, c, t] = label_map[t][y]`` for any source label
  y with ``label_map[s][y] = c``, whenever task s refines task t (every class
  of s lies inside one class of t).

  Args:
    label_map: int [T, Y], each task's label of each source label (digits:
      Y = 10); needed by ``'refines'`` only.
    task_classes: int [T], classes per task; L = max of them.
    rule: one of :data:`LABEL_RULES`.

  Raises:
    ValueError: unknown rule, or ``'refines'`` without a label map.
  """
  if rule not in LABEL_RULES:
    raise ValueError(f"cofed_cotrain.label_rule='{rule}' unknown; use one of {LABEL_RULES} "
                     "(--config.cofed_cotrain.label_rule).")
  num_tasks, width = len(task_classes), int(max(task_classes))
  out = np.full((num_tasks, width, num_tasks), -1, np.int32)
  for t in range(num_tasks):
    out[t, :task_classes[t], t] = np.arange(task_classes[t])
  if rule == "same_task":
    return out
  if label_map is None:
    raise ValueError("cofed_cotrain.label_rule='refines' needs the tasks' label maps (data aux "
                     "task_label_map); use label_rule='same_task' or "
                     "--config.data.dataset=digits_multitask.")
  label_map = np.asarray(label_map)
  for s in range(num_tasks):
    for t in range(num_tasks):
      image = [set(label_map[t][label_map[s] == c].tolist()) for c in range(task_classes[s])]
      if s != t and all(len(i) == 1 for i in image):  # s refines t
        out[s, :task_classes[s], t] = [i.pop() for i in image]
  return out


def pseudo_labels(preds: jax.Array, uploaded: jax.Array, tasks: jax.Array, votes: jax.Array,
                  agreement: float) -> jax.Array:
  """Each user's pseudo labels on the public batch from the other users' predictions.

  Args:
    preds: int32 [C, B], every user's predicted class (its own task's ids).
    uploaded: bool [C], users whose predictions count.
    tasks: int32 [C], task id per user.
    votes: int32 [T, L, T], :func:`vote_table`.
    agreement: a class is kept when its votes exceed ``agreement`` x all votes.

  Returns:
    int32 [C, B]: yhat_u(b), the most voted class of u's task (ties: smallest
    id), or -1 when no one voted or the winner has too few votes.
  """
  num_users, num_classes = preds.shape[0], votes.shape[1]
  mapped = votes[tasks[None, :, None], preds[None, :, :], tasks[:, None, None]]  # [C_u, C_v, B]
  others = jnp.arange(num_users)[:, None] != jnp.arange(num_users)[None, :]
  ok = (mapped >= 0) & (uploaded[None, :] & others)[:, :, None]
  counts = jnp.sum(jax.nn.one_hot(jnp.maximum(mapped, 0), num_classes, dtype=jnp.float32)
                   * ok[..., None], axis=1)  # [C_u, B, L]
  total = jnp.sum(counts, axis=-1)
  top = jnp.argmax(counts, axis=-1)
  keep = (total > 0) & (jnp.max(counts, axis=-1) > agreement * total)
  return jnp.where(keep, top, -1).astype(jnp.int32)


def cofed_term(tasks: np.ndarray, task_classes: Sequence[int], votes: np.ndarray,
               public_batch: int, pseudo_weight: float, agreement: float) -> PublicTerm:
  """CoFED's term: lambda * CE of the task-masked logits on this round's kept pseudo labels."""
  num_users = len(tasks)
  bias_table = jnp.asarray(fm.task_bias(task_classes, int(max(task_classes))))
  task_of, votes = jnp.asarray(tasks, jnp.int32), jnp.asarray(votes)

  def upload(um, params, x, task):
    return jnp.argmax(um.logits(params, x) + bias_table[task], axis=-1).astype(jnp.int32)

  def value(um, params, x, task, me, pseudo):
    lab = pseudo[me]
    return masked_cross_entropy(um.logits(params, x) + bias_table[task], jnp.maximum(lab, 0),
                                lab >= 0)

  return PublicTerm(
      init=lambda: jnp.full((num_users, public_batch), -1, jnp.int32), upload=upload,
      aggregate=lambda old, preds, uploaded: pseudo_labels(preds, uploaded, task_of, votes,
                                                           agreement),
      value=value, weight=lambda round_: jnp.asarray(pseudo_weight, jnp.float32),
      upload_shape=((public_batch,), jnp.int32))


def cofed_cotrain(archs: Sequence[str], tasks: np.ndarray, public_x: jax.Array, *,
                  input_shape: tuple, task_classes: Sequence[int],
                  task_label_map: Optional[np.ndarray] = None, pseudo_weight: float = 1.0,
                  agreement: float = 0.5, label_rule: str = "same_task", public_batch: int = 32,
                  proj_dim: int = 32, client_lr: float, batch_size: int, epochs: int = 1,
                  local_steps: int = 0, client_momentum: float = 0.0, lr_decay: float = 1.0,
                  client_ids: Optional[Sequence[np.ndarray]] = None,
                  local_baseline: bool = False) -> FederatedAlgorithm:
  """CoFED (arXiv 2202.08603) on FedMuscle's multi-task users, as a pooled FederatedAlgorithm.

  Args:
    archs: distinct MODEL_ZOO names, one pool each (users round-robin).
    tasks: int [C] (host), task id per user.
    public_x: float32 [N_pub, ...], the public split (unlabeled).
    input_shape: shape of one example.
    task_classes: int [T], classes per task (FedMuscle's masked 10-wide head).
    task_label_map: int [T, Y], each task's label of each source label (data
      aux ``task_label_map``); needed by ``label_rule='refines'``.
    pseudo_weight: lambda, the weight of the pseudo-labelled public CE.
    agreement: the winner's share of the votes must exceed it, in [0, 1).
    label_rule: ``'same_task'`` or ``'refines'`` (:func:`vote_table`).
    public_batch: B, public examples per round.
    proj_dim: d.
    client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay:
      local task fine-tuning.
    client_ids: optional explicit user-to-pool assignment.
    local_baseline: also train every user's local-training shadow model and
      report ``delta_pct``.

  Returns:
    A FederatedAlgorithm (:func:`~fedjax_sim.algorithms.public_set.public_set_method`),
    server term: pseudo labels int32 [C, B].

  Raises:
    ValueError: a knob out of range, an unknown rule, ``'refines'`` without a
      label map, repeated architectures, or a public batch larger than the public set.
  """
  if concrete(pseudo_weight) and pseudo_weight < 0:
    raise ValueError(f"cofed_cotrain.pseudo_weight={pseudo_weight} must be >= 0; set "
                     "--config.cofed_cotrain.pseudo_weight.")
  if concrete(agreement) and not 0 <= agreement < 1:
    raise ValueError(f"cofed_cotrain.agreement={agreement} must be in [0, 1); set "
                     "--config.cofed_cotrain.agreement.")
  votes = vote_table(task_label_map, task_classes, label_rule)
  term = cofed_term(np.asarray(tasks), task_classes, votes, public_batch, pseudo_weight,
                    agreement)
  return public_set_method(
      "cofed_cotrain", term, archs, tasks, public_x, input_shape=input_shape,
      task_classes=task_classes, public_batch=public_batch, proj_dim=proj_dim,
      client_lr=client_lr, batch_size=batch_size, epochs=epochs, local_steps=local_steps,
      client_momentum=client_momentum, lr_decay=lr_decay, client_ids=client_ids,
      local_baseline=local_baseline)


@register("cofed_cotrain", cofed_cotrain, pooled=True,
          fixed=("client_ids", "local_baseline", "task_label_map"))
def _build(ctx, **knobs):
  """CoFED from a run config: pools ``--config.archs``, knobs ``--config.cofed_cotrain.<knob>``,
  the users' tasks, label maps and public set from the data (dataset ``digits_multitask``), the
  local-training shadow trained alongside so every evaluation row has ``delta_pct``.

  Raises:
    ConfigError: the data have no public set or no per-user tasks.
  """
  aux = multitask_aux(ctx, "cofed_cotrain")
  return cofed_cotrain(ctx.archs, aux["tasks"], aux["public_x"],
                       input_shape=ctx.spec.input_shape, task_classes=aux["task_classes"],
                       task_label_map=aux.get("task_label_map"), local_baseline=True,
                       **ctx.client, **knobs)
