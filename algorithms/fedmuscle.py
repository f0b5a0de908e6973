"""FedMuscle: multi-model contrastive alignment on a public dataset, multi-task users.

Paper: "Toward Enhancing Representation Learning in Federated Multi-Task
Settings", ICLR 2026, arXiv 2602.01626 (Muscle loss: its Sec. 3; FedMuscle
round: its Algorithm 1; our reading: ``docs/decisions.md#fedmuscle``).
The loss lives in :func:`fedjax_sim.algorithms.losses.muscle_loss`.

Users have different models (model pools: one MODEL_ZOO architecture per pool,
each followed by a linear projection to a common dimension d) AND different
tasks (a per-user label map and head; the data, users' tasks and the public
set come from ``data/``: dataset ``digits_multitask``,
:mod:`fedjax_sim.data.multitask`). No parameters are shared. Per round, as in the paper:

1. every user fine-tunes its whole model for E local epochs on its own task;
2. it uploads its representation matrix Z^n = normalize(proj(enc(x_pub))),
   float32 [B, d], of this round's public batch;
3. the server returns M other users' matrices (sampled uniformly among the
   users who uploaded for that batch, the user itself excluded);
4. the user takes T gradient steps on the chosen alignment loss (Muscle by
   default) on its REPRESENTATION model only (encoder + projection; the task
   head is frozen), the M matrices held fixed.

How the server's reply fits one jitted round [ours]: the engine runs one
client phase and then one server phase per round, so step 4 of round t runs
at the START of the client phase of round t+1, on round t's public batch,
against the matrices the server stored in its state (``reps`` [C, B, d],
scattered in by ``server_update`` at the end of round t). A user's model at
that point is exactly the model that produced its own upload (nothing ran in
between), and the others' matrices are exactly what the server would have
sent back, so the sequence FT -> upload -> Muscle -> FT -> ... per user is the
paper's, with the round boundary drawn between upload and Muscle. Hence:
round 0 has no alignment; an evaluation after round t sees the model after
FT_t and before Muscle_t (the state after the task fine-tuning). A user only
pairs with matrices uploaded in the previous round (same public batch, which
is a pure function of (seed, round)); with fewer than M such users it skips
alignment that round. All users join every round (the paper's setting;
``clients_per_round`` of each pool = its size).

Decisions (``docs/decisions.md#fedmuscle``): tau^(N) = 0.2, tau^(N-1) = 0.15,
gamma = 1/tau^(N-1) - 1/tau^(N); the denominator includes the positive; M = 3
default; the efficient form avoids materializing the B^M combinations (see
``muscle_loss``). [ours] d = 32, B = 32 public examples per round,
alignment = T plain-SGD steps (fresh optimizer each round); the same
temperature tau^(N) for the pairwise and Gramian baselines; tasks by a label
map of the digit label (``fedjax_sim.data.multitask.TASKS``), a shared
10-wide head whose non-existent classes are masked with a -1e9 logit bias.

One compiled program for every method: the method is an int32 in the server
state (``METHODS``; ``local`` skips alignment, so it is local training on the
very same data, initialization and schedule) and the run's randomness key is
in the server state too, so methods and seeds share one executable (set them
with :func:`set_method`; the engine's own seed is not used by this algorithm).

Delta(%) in a single run [ours] (``docs/decisions.md#fedmuscle``): with
``local_baseline=True`` (what ``fedjax-sim run`` builds) every user also
trains a shadow copy of its model by local training alone: same
initialization, data, batch order and schedule as the ``local`` method, no
alignment. The algorithm's ``evaluate`` hook then reports ``delta_pct``, the
paper's metric against that baseline, in every evaluation row.

Axis legend: C users (clients), K cohort, N examples, B public batch, D / d
embedding (d: the common representation dimension), M other users per anchor.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import evaluation, models
from fedjax_sim.checks import concrete
from fedjax_sim.errors import ConfigError
from fedjax_sim.metrics import l2_normalize
from fedjax_sim.protocol import (FederatedAlgorithm, Pool, client_optimizer, local_train,
                                 masked_cross_entropy)
from fedjax_sim.algorithms import losses
from fedjax_sim.algorithms.pooled import assign_round_robin
from fedjax_sim.algorithms.registry import register

METHODS = ("local", "muscle", "pairwise", "gram")

_NEG = -1e9


def task_bias(task_classes: Sequence[int], width: int) -> np.ndarray:
  """float32 [T, width]: 0 on task t's classes 0..task_classes[t]-1, -1e9 on the rest."""
  return np.array([[0.0 if c < n else _NEG for c in range(width)] for n in task_classes],
                  np.float32)


# ---------------------------------------------------------------------------
# Models: encoder (MODEL_ZOO body) -> projection to d -> task head.
# ---------------------------------------------------------------------------

class UserModel(NamedTuple):
  """Functions of one architecture's user model. Params: {"encoder", "proj", "head"}."""
  init: callable  # rng -> params
  represent: callable  # (params, x [B, ...]) -> float32 [B, d] (unnormalized)
  logits: callable  # (params, x [B, ...]) -> float32 [B, L]


def user_model(arch: str, input_shape: tuple, proj_dim: int,
               num_classes: int = 10) -> UserModel:
  """MODEL_ZOO ``arch``'s embedding path, a Dense(d) projection and a Dense(L) head.

  The head reads the d-dimensional representation, so aligning the
  representation model (encoder + projection) shapes the head's input.
  """
  enc = models.build_zoo_model(arch, 1)  # its 1-way classifier is unused
  x0 = jnp.zeros((1, *input_shape), jnp.float32)
  emb_dim = jax.eval_shape(lambda p: enc.apply({"params": p}, x0, return_embedding=True)[1],
                           jax.eval_shape(lambda: models.init_params(enc, jax.random.PRNGKey(0),
                                                                     input_shape))).shape[-1]
  proj, head = nn.Dense(proj_dim), nn.Dense(num_classes)

  def init(rng):
    k1, k2, k3 = jax.random.split(rng, 3)
    return {"encoder": models.init_params(enc, k1, input_shape),
            "proj": proj.init(k2, jnp.zeros((1, emb_dim)))["params"],
            "head": head.init(k3, jnp.zeros((1, proj_dim)))["params"]}

  def represent(p, x):
    z = enc.apply({"params": p["encoder"]}, x, return_embedding=True)[1]
    return proj.apply({"params": p["proj"]}, z)

  def logits(p, x):
    return head.apply({"params": p["head"]}, represent(p, x))

  return UserModel(init, represent, logits)


# ---------------------------------------------------------------------------
# The algorithm.
# ---------------------------------------------------------------------------

class MuscleServerState(NamedTuple):
  """Server state.

  Attributes:
    reps: float32 [C, B, d]: each user's last uploaded L2-normalized
      representation matrix of a public batch.
    rep_round: int32 [C]: the round of that upload (-1: none yet).
    round: int32 []: rounds completed (the public batch of round r is a pure
      function of (key, r)).
    method: int32 []: index into :data:`METHODS`.
    key: uint32 [2]: the run's key (public batches, other-user sampling,
      shuffles); from the engine's init key, so it carries the run seed.
  """
  reps: jax.Array
  rep_round: jax.Array
  round: jax.Array
  method: jax.Array
  key: jax.Array


class MuscleClientState(NamedTuple):
  """One user's persistent state.

  Attributes:
    params: its own model ``{"encoder", "proj", "head"}``.
    task: int32 [], its task id.
    local: the local-training baseline's params (same structure), or None
      without ``local_baseline``.
  """
  params: dict
  task: jax.Array
  local: Optional[dict] = None


def public_batch_indices(key: jax.Array, round_: jax.Array, num_public: int,
                         batch: int) -> jax.Array:
  """int32 [B]: round ``round_``'s public batch, B distinct indices in [0, N_pub)."""
  return jax.random.permutation(jax.random.fold_in(key, round_), num_public)[:batch]


def alignment_losses(M: int, tau_n: float, tau_n1: float):
  """Branches for ``lax.switch`` in :data:`METHODS` order.

  Each is ``(z [B, d], others [M, B, d]) -> []``.
  """
  del M
  return (
      lambda z, o: jnp.float32(0.0),
      lambda z, o: losses.muscle_loss(z, o, tau_n, tau_n1),
      lambda z, o: losses.pairwise_info_nce(z, o, tau_n),
      lambda z, o: losses.gram_volume_loss(z, o, tau_n),
  )


def user_pool(arch: str, members, um, bias_table: jax.Array, client_update,
              local_baseline: bool) -> Pool:
  """The :class:`Pool` of one architecture's users: per-user :class:`MuscleClientState`
  (a fresh model, task 0 until :func:`with_tasks`, the local-training shadow with
  ``local_baseline``), evaluated with the user's task bias. Shared by FedMuscle and the
  public-batch baselines (:mod:`fedjax_sim.algorithms.public_set`)."""
  def init_client(rng):
    params = um.init(rng)
    return MuscleClientState(params, jnp.int32(0), params if local_baseline else None)

  return Pool(
      name=arch, client_ids=np.asarray(members, np.int32), clients_per_round=len(members),
      client_update=client_update, init_client=init_client,
      eval_params=lambda s, c: {"model": c.params, "bias": bias_table[c.task]},
      apply_fn=lambda p, x: um.logits(p["model"], x) + p["bias"])


def fedmuscle(archs: Sequence[str], tasks: np.ndarray, public_x: jax.Array, *,
              input_shape: tuple, task_classes: Sequence[int], method: str = "muscle",
              M: int = 3, tau_n: float = 0.2, tau_n1: float = 0.15, public_batch: int = 32,
              proj_dim: int = 32, align_steps: int = 5, align_lr: float = 0.05,
              client_lr: float, batch_size: int, epochs: int = 1, local_steps: int = 0,
              client_momentum: float = 0.0, lr_decay: float = 1.0,
              client_ids: Optional[Sequence[np.ndarray]] = None,
              local_baseline: bool = False) -> FederatedAlgorithm:
  """FedMuscle (and its baselines, by ``method``) as a pooled FederatedAlgorithm.

  Args:
    archs: distinct MODEL_ZOO names, one pool each (users round-robin).
    tasks: int [C] (host), task id per user (index into ``task_classes``).
    public_x: float32 [N_pub, ...], the public split (unlabeled).
    input_shape: shape of one example.
    task_classes: int [T], number of classes of each task; the head has
      L = max(task_classes) outputs and task t's classes are 0..task_classes[t]-1
      (the others get a -1e9 logit bias).
    method: one of :data:`METHODS` (the initial value of the state's
      ``method``; :func:`set_method` changes it without recompiling).
    M: other users per anchor (N = M + 1 models per tuple).
    tau_n, tau_n1: tau^(N), tau^(N-1) of the Muscle loss.
    public_batch: B, public examples per round.
    proj_dim: d.
    align_steps: T, alignment SGD steps per round; align_lr their step size.
    client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay:
      local task fine-tuning (E epochs, or local_steps steps, of minibatch SGD
      at client_lr * lr_decay**round, fresh optimizer each round).
    client_ids: optional explicit user-to-pool assignment.
    local_baseline: also train every user's local-training baseline (a
      shadow model, :class:`MuscleClientState` ``local``) and report
      ``delta_pct`` from the ``evaluate`` hook.

  Returns:
    A FederatedAlgorithm with one :class:`~fedjax_sim.protocol.Pool` per
    architecture (``clients_per_round`` = pool size: all users join) and an
    ``evaluate`` hook (:func:`make_user_evaluate`).

  Raises:
    ValueError: unknown method, M out of range, repeated architectures, or a
      public batch larger than the public set.
  """
  tasks = np.asarray(tasks, np.int32)
  num_users = len(tasks)
  if method not in METHODS:
    raise ValueError(f"method '{method}' unknown; use one of {METHODS} "
                     "(--config.fedmuscle.method).")
  if not 1 <= M <= num_users - 1:
    raise ValueError(f"M={M} other users need 1 <= M <= C - 1 = {num_users - 1}; set "
                     "--config.fedmuscle.M.")
  if len(set(archs)) != len(archs):
    raise ValueError(f"architectures {list(archs)} repeat; list each MODEL_ZOO name once.")
  ids = list(client_ids) if client_ids is not None else assign_round_robin(num_users, len(archs))
  num_public = int(public_x.shape[0])
  if public_batch > num_public:
    raise ValueError(f"public_batch={public_batch} > {num_public} public examples; lower "
                     "--config.fedmuscle.public_batch or raise --config.data.public_per_class.")
  public_x = jnp.asarray(public_x)
  task_of = jnp.asarray(tasks)
  num_classes = int(max(task_classes))
  bias_table = jnp.asarray(task_bias(task_classes, num_classes))
  branches = alignment_losses(M, tau_n, tau_n1)
  decay = not (concrete(lr_decay) and lr_decay == 1.0)  # a literal 1: the undecayed optimizer

  def make_pool(arch, members):
    um = user_model(arch, tuple(input_shape), proj_dim, num_classes)

    def ce_loss(p, x, y, m, task):
      return masked_cross_entropy(um.logits(p, x) + bias_table[task], y, m)

    def align(server, params, key, me):
      """T steps of the alignment loss on the previous round's public batch."""
      prev = server.round - 1
      x_prev = public_x[public_batch_indices(server.key, prev, num_public, public_batch)]
      fresh = (server.rep_round == prev) & (jnp.arange(num_users) != me)
      scores = jnp.where(fresh, jax.random.uniform(key, (num_users,)), -1.0)
      _, sel = jax.lax.top_k(scores, M)
      others = server.reps[sel]  # [M, B, d], constants
      ready = jnp.sum(fresh) >= M

      def loss_fn(p):
        z = l2_normalize(um.represent(p, x_prev))
        return jax.lax.switch(server.method, branches, z, others)

      opt = optax.sgd(align_lr)

      def step(_, carry):
        p, s, total = carry
        loss, g = jax.value_and_grad(loss_fn)(p)
        g = {**g, "head": jax.tree.map(jnp.zeros_like, g["head"])}  # representation model only
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, total + loss

      new, _, total = jax.lax.fori_loop(0, align_steps, step,
                                        (params, opt.init(params), jnp.float32(0.0)))
      new = jax.tree.map(lambda a, b: jnp.where(ready, a, b), new, params)
      return new, jnp.where(ready, total / align_steps, 0.0), ready.astype(jnp.float32)

    def client_update(server, cstate, data, rng, info):
      del rng  # the run key lives in the server state (seeds share one program)
      me = info.client_id
      task = task_of[me]
      key = jax.random.fold_in(jax.random.fold_in(server.key, server.round), me)
      k_sel, k_ft = jax.random.split(key)
      params = cstate.params
      # (4) of round t-1: align against the matrices the server holds. The
      # predicate is unbatched, so under vmap this stays a real branch.
      do_align = (server.method != 0) & (server.round > 0)
      params, align_loss, aligned = jax.lax.cond(
          do_align, lambda p: align(server, p, k_sel, me),
          lambda p: (p, jnp.float32(0.0), jnp.float32(0.0)), params)
      # (1) local fine-tuning of the whole model on the user's own task.
      opt = (client_optimizer(client_lr, client_momentum, lr_decay, server.round) if decay
             else client_optimizer(client_lr, client_momentum))
      fine_tune = lambda p: local_train(lambda p, x, y, m, r: ce_loss(p, x, y, m, task), p, opt,
                                        data, k_ft, epochs=epochs, batch_size=batch_size,
                                        local_steps=local_steps)
      res = fine_tune(params)
      params = res.params
      # (2) upload this round's public-batch representation matrix.
      x_pub = public_x[public_batch_indices(server.key, server.round, num_public, public_batch)]
      upload = l2_normalize(um.represent(params, x_pub))
      metrics = {**res.metrics, "align_loss": align_loss, "aligned": aligned}
      local = None
      if local_baseline:  # the local method's model: the same fine-tuning, never aligned
        res_local = fine_tune(cstate.local)
        local = res_local.params
        metrics["local_loss"] = res_local.metrics["loss"]
      return upload, MuscleClientState(params, task, local), metrics

    return user_pool(arch, members, um, bias_table, client_update, local_baseline)

  pools = tuple(make_pool(a, m) for a, m in zip(archs, ids))

  def init(rng):
    return MuscleServerState(
        reps=jnp.zeros((num_users, public_batch, proj_dim), jnp.float32),
        rep_round=jnp.full((num_users,), -1, jnp.int32), round=jnp.int32(0),
        method=jnp.int32(METHODS.index(method)), key=rng)

  def server_update(state, uploads, weights, infos, rng):
    """(3) store the uploaded matrices; the next round's clients read them."""
    del weights, rng
    reps, rep_round = state.reps, state.rep_round
    for up, info in zip(uploads, infos):
      idx = jnp.where(info.valid, info.client_ids, num_users)  # padding -> dropped
      reps = reps.at[idx].set(up, mode="drop")
      rep_round = rep_round.at[idx].set(state.round, mode="drop")
    new = state._replace(reps=reps, rep_round=rep_round, round=state.round + 1)
    return new, {"fresh_users": jnp.sum(rep_round == state.round).astype(jnp.float32)}

  alg = FederatedAlgorithm(
      name="fedmuscle", init=init, init_client=None, client_update=None,
      server_update=server_update, eval_params=None, apply_fn=None, personalized=True,
      pools=pools)
  return alg._replace(evaluate=make_user_evaluate(alg, tasks, local_baseline))


def set_method(state, method: str):
  """The SimState with the server's ``method`` set to ``METHODS.index(method)``.

  The new leaf gets the old one's sharding, so the round does not recompile.
  """
  old = state.server.method
  server = state.server._replace(
      method=jax.device_put(jnp.int32(METHODS.index(method)), old.sharding))
  return state._replace(server=server)


def with_tasks(state, algorithm: FederatedAlgorithm, tasks: np.ndarray):
  """The SimState with ``clients[p].task`` = ``tasks[pool p's users]`` (int32).

  Client updates write the task too; filling it in at init makes an evaluation
  before round 1 correct.
  """
  clients = tuple(c._replace(task=jax.device_put(
      jnp.asarray(np.asarray(tasks)[p.client_ids], jnp.int32), c.task.sharding))
                  for c, p in zip(state.clients, algorithm.pools))
  return state._replace(clients=clients)


def delta_percent(acc: np.ndarray, acc_local: np.ndarray) -> float:
  """The paper's Delta(%): mean over users of (acc_u - acc_local_u) / acc_local_u * 100.

  Args: acc, acc_local float [C] per-user test accuracies (same user order).
  """
  acc, acc_local = np.asarray(acc, np.float64), np.asarray(acc_local, np.float64)
  return float(np.mean((acc - acc_local) / acc_local) * 100.0)


def user_accuracy(raw: dict, pools: Sequence[Pool]) -> np.ndarray:
  """float [C] per-user accuracy in global user order from ``make_evaluate`` outputs."""
  acc = np.zeros(sum(len(p.client_ids) for p in pools))
  for p in pools:
    c = np.asarray(raw[f"{p.name}/client_correct"])
    n = np.asarray(raw[f"{p.name}/client_count"])
    acc[np.asarray(p.client_ids)] = c / np.maximum(n, 1)
  return acc


def make_user_evaluate(algorithm: FederatedAlgorithm, tasks: np.ndarray, local_baseline: bool):
  """FedMuscle's ``evaluate`` hook: ``(server_state, client_states, data) -> dict[str, float]``.

  The engine's classification metrics (:func:`fedjax_sim.evaluation.summarize`)
  of every user on its own test split, under its own task (task ids from
  ``tasks`` int [C], so an evaluation before round 1 is right too). With
  ``local_baseline``: also ``local_test_accuracy`` / ``local_client_acc_mean``
  of the shadow local-training models, and ``delta_pct``, the paper's
  Delta(%) = mean over users of (acc_u - acc_local_u) / acc_local_u * 100
  (:func:`delta_percent`; users whose baseline accuracy is 0 are left out,
  their ratio being undefined).
  """
  tasks = np.asarray(tasks, np.int32)
  ids = [np.asarray(p.client_ids) for p in algorithm.pools]
  main = evaluation.make_evaluate(algorithm)
  shadow = algorithm._replace(pools=tuple(
      p._replace(eval_params=lambda s, c, f=p.eval_params: f(s, c._replace(params=c.local)))
      for p in algorithm.pools))
  local = evaluation.make_evaluate(shadow) if local_baseline else None

  def evaluate(server_state, client_states, data) -> dict:
    clients = tuple(c._replace(task=tasks[i]) for c, i in zip(client_states, ids))
    num_test = int(data.test_y.shape[0])
    raw = main(server_state, clients, data.test, data.test_x, data.test_y)
    out = evaluation.summarize(raw, num_test)
    if local is not None:
      raw_local = local(server_state, clients, data.test, data.test_x, data.test_y)
      base = evaluation.summarize(raw_local, num_test)
      out["local_test_accuracy"] = base["test_accuracy"]
      out["local_client_acc_mean"] = base["client_acc_mean"]
      acc, acc_local = user_accuracy(raw, algorithm.pools), user_accuracy(raw_local,
                                                                           algorithm.pools)
      ok = acc_local > 0
      out["delta_pct"] = delta_percent(acc[ok], acc_local[ok]) if ok.any() else float("nan")
    return out

  return evaluate


@register("fedmuscle", fedmuscle, pooled=True, fixed=("client_ids", "local_baseline"))
def _build(ctx, **knobs):
  """FedMuscle from a run config: pools ``--config.archs``; knobs ``--config.fedmuscle.<knob>``;
  users' tasks and the public set from the data (dataset ``digits_multitask``:
  ``ctx.data.aux``); the local-training baseline trained alongside, so every
  evaluation row has ``delta_pct``.

  Raises:
    ConfigError: the data have no public set or no per-user tasks.
  """
  aux = getattr(ctx.data, "aux", None) or {}
  missing = [k for k in ("public_x", "tasks", "task_classes") if k not in aux]
  if missing:
    raise ConfigError(f"fedmuscle needs multi-task users and a public set (data aux "
                      f"{', '.join(missing)}); set --config.data.dataset=digits_multitask.")
  return fedmuscle(ctx.archs, aux["tasks"], aux["public_x"], input_shape=ctx.spec.input_shape,
                   task_classes=aux["task_classes"], local_baseline=True, **ctx.client, **knobs)
