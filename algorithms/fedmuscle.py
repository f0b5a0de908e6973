"""FedMuscle: multi-model contrastive alignment on a public dataset, multi-task users.

Paper: "Toward Enhancing Representation Learning in Federated Multi-Task
Settings", ICLR 2026, arXiv 2602.01626 (Muscle loss: its Sec. 3; FedMuscle
round: its Algorithm 1; our reading: ``docs/decisions.md#fedmuscle``).
The loss lives in :func:`fedjax_sim.algorithms.losses.muscle_loss`.

Users have different models (model pools: one MODEL_ZOO architecture per pool,
each followed by a linear projection to a common dimension d) AND different
tasks (a per-user label map and head; :data:`TASKS`). No parameters are
shared. Per round, as in the paper:

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
map of the digit label (:data:`TASKS`), a shared 10-wide head whose
non-existent classes are masked with a -1e9 logit bias.

One compiled program for every method: the method is an int32 in the server
state (``METHODS``; ``local`` skips alignment, so it is local training on the
very same data, initialization and schedule) and the run's randomness key is
in the server state too, so methods and seeds share one executable (set them
with :func:`set_method`; the engine's own seed is not used by this algorithm).

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

from fedjax_sim import models, seeding
from fedjax_sim.protocol import (FederatedAlgorithm, Pool, client_optimizer, local_train,
                                 masked_cross_entropy)
from fedjax_sim.algorithms import losses
from fedjax_sim.algorithms.pooled import assign_round_robin
from fedjax_sim.client_data import ClientData, pack, to_device

METHODS = ("local", "muscle", "pairwise", "gram")

# Tasks on digit labels 0..9: name -> (label map [10], number of classes).
TASKS: dict[str, tuple[tuple[int, ...], int]] = {
    "digit10": (tuple(range(10)), 10),  # 10-way digit classification
    "parity": (tuple(y % 2 for y in range(10)), 2),  # odd vs even
    "gt4": (tuple(int(y > 4) for y in range(10)), 2),  # 5..9 vs 0..4
    "mod3": (tuple(y % 3 for y in range(10)), 3),  # 3-way grouping {0,3,6,9} {1,4,7} {2,5,8}
}
TASK_NAMES = tuple(TASKS)
MAX_CLASSES = 10
_NEG = -1e9


def task_tables() -> tuple[np.ndarray, np.ndarray]:
  """(label_map int32 [T, 10], logit_bias float32 [T, 10]) in :data:`TASK_NAMES` order."""
  label_map = np.array([TASKS[t][0] for t in TASK_NAMES], np.int32)
  bias = np.array([[0.0 if c < TASKS[t][1] else _NEG for c in range(MAX_CLASSES)]
                   for t in TASK_NAMES], np.float32)
  return label_map, bias


# ---------------------------------------------------------------------------
# Data: users' multi-task splits and the public split.
# ---------------------------------------------------------------------------

class MultiTaskDigits(NamedTuple):
  """Users' data for the multi-task digits setup (device-resident arrays).

  Attributes:
    train: ClientData [C, N]: user u's training examples, labels already mapped
      to its task (``TASKS[task_names[tasks[u]]]``).
    test: ClientData [C, N_t]: the global digits test set (450 examples), once
      per user, labels mapped to that user's task.
    public_x: float32 [N_pub, 8, 8, 1]: the public split (used unlabeled).
    public_idx: int64 [N_pub] (host): indices of the public examples in
      ``data.sources.load_digits()``'s train split.
    tasks: int32 [C] (host): task id per user (index into :data:`TASK_NAMES`).
    input_shape: (8, 8, 1).
  """
  train: ClientData
  test: ClientData
  public_x: jax.Array
  public_idx: np.ndarray
  tasks: np.ndarray
  input_shape: tuple


def build_multitask_digits(num_users: int = 12, examples_per_user: int = 40,
                           public_per_class: int = 30, *, partition: str = "iid",
                           alpha: float = 0.5, seed: int = 0, batch_size: int = 10,
                           public_seed: int = 0,
                           task_names: Sequence[str] = TASK_NAMES) -> MultiTaskDigits:
  """The public split, users' partitions and task labels (scikit-learn digits).

  Public split (no user owns it): from ``load_digits()``'s train split (1,347
  examples; the 450-example test split is untouched), for each class c the
  first ``public_per_class`` indices of class c after
  a permutation from the ``server_data`` NumPy stream of ``public_seed``
  (:mod:`fedjax_sim.seeding`); 300 examples by default. It does not depend on
  ``seed``. The rest is partitioned over users with
  ``data.partitioners.partition(method=partition)`` on ``seed``'s
  ``partition`` stream, and each user keeps ``examples_per_user`` examples of
  its part (the first after a shuffle from ``seed``'s ``split`` stream). User
  u has task ``u mod len(task_names)``.

  Args:
    num_users: C.
    examples_per_user: training examples per user (fewer if its part is smaller).
    public_per_class: public examples per digit class.
    partition: ``iid`` or ``dirichlet`` (``alpha``) over the digit labels.
    seed: partition seed.
    batch_size: users' N is padded to a multiple of it.
    public_seed: seed of the public split.
    task_names: the task cycle over users.
  """
  from fedjax_sim.data import partitioners, sources
  ds = sources.load_digits()
  prng = seeding.numpy_rng(public_seed, "server_data")
  public_idx = np.sort(np.concatenate([
      prng.permutation(np.flatnonzero(ds.train_y == c))[:public_per_class] for c in range(10)]))
  rest = np.setdiff1d(np.arange(len(ds.train_y)), public_idx)
  parts = partitioners.partition(ds.train_y[rest], num_users, partition,
                                 seeding.numpy_seed(seed, "partition"), alpha=alpha)
  urng = seeding.numpy_rng(seed, "split")
  parts = [rest[urng.permutation(p)[:examples_per_user]] for p in parts]
  label_map, _ = task_tables()
  tasks = np.array([TASK_NAMES.index(task_names[u % len(task_names)])
                    for u in range(num_users)], np.int32)
  train = pack([ds.train_x[p] for p in parts],
               [label_map[tasks[u]][ds.train_y[p]] for u, p in enumerate(parts)], batch_size)
  test = pack([ds.test_x] * num_users, [label_map[t][ds.test_y] for t in tasks])
  return MultiTaskDigits(to_device(train), to_device(test),
                         jax.device_put(ds.train_x[public_idx]), public_idx, tasks,
                         tuple(ds.input_shape))


# ---------------------------------------------------------------------------
# Models: encoder (MODEL_ZOO body) -> projection to d -> task head.
# ---------------------------------------------------------------------------

class UserModel(NamedTuple):
  """Functions of one architecture's user model. Params: {"encoder", "proj", "head"}."""
  init: callable  # rng -> params
  represent: callable  # (params, x [B, ...]) -> float32 [B, d] (unnormalized)
  logits: callable  # (params, x [B, ...]) -> float32 [B, 10]


def user_model(arch: str, input_shape: tuple, proj_dim: int) -> UserModel:
  """MODEL_ZOO ``arch``'s embedding path, a Dense(d) projection and a Dense(10) head.

  The head reads the d-dimensional representation, so aligning the
  representation model (encoder + projection) shapes the head's input.
  """
  enc = models.build_zoo_model(arch, 1)  # its 1-way classifier is unused
  x0 = jnp.zeros((1, *input_shape), jnp.float32)
  emb_dim = jax.eval_shape(lambda p: enc.apply({"params": p}, x0, return_embedding=True)[1],
                           jax.eval_shape(lambda: models.init_params(enc, jax.random.PRNGKey(0),
                                                                     input_shape))).shape[-1]
  proj, head = nn.Dense(proj_dim), nn.Dense(MAX_CLASSES)

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
  """One user's persistent state: params (its own model) and task id (int32 [])."""
  params: dict
  task: jax.Array


def public_batch_indices(key: jax.Array, round_: jax.Array, num_public: int,
                         batch: int) -> jax.Array:
  """int32 [B]: round ``round_``'s public batch, B distinct indices in [0, N_pub)."""
  return jax.random.permutation(jax.random.fold_in(key, round_), num_public)[:batch]


def alignment_losses(M: int, tau_n: float, tau_n1: float):
  """Branches for ``lax.switch`` in :data:`METHODS` order: ``(z [B, d], others [M, B, d]) -> []``."""
  del M
  return (
      lambda z, o: jnp.float32(0.0),
      lambda z, o: losses.muscle_loss(z, o, tau_n, tau_n1),
      lambda z, o: losses.pairwise_info_nce(z, o, tau_n),
      lambda z, o: losses.gram_volume_loss(z, o, tau_n),
  )


def fedmuscle(archs: Sequence[str], tasks: np.ndarray, public_x: jax.Array, *,
              input_shape: tuple, method: str = "muscle", M: int = 3, tau_n: float = 0.2,
              tau_n1: float = 0.15, public_batch: int = 32, proj_dim: int = 32,
              align_steps: int = 5, align_lr: float = 0.05, client_lr: float = 0.05,
              client_momentum: float = 0.9, batch_size: int = 10, epochs: int = 1,
              client_ids: Optional[Sequence[np.ndarray]] = None) -> FederatedAlgorithm:
  """FedMuscle (and its baselines, by ``method``) as a pooled FederatedAlgorithm.

  Args:
    archs: distinct MODEL_ZOO names, one pool each (users round-robin).
    tasks: int [C] (host), task id per user (index into :data:`TASK_NAMES`).
    public_x: float32 [N_pub, ...], the public split (unlabeled).
    input_shape: shape of one example.
    method: one of :data:`METHODS` (the initial value of the state's
      ``method``; :func:`set_method` changes it without recompiling).
    M: other users per anchor (N = M + 1 models per tuple).
    tau_n, tau_n1: tau^(N), tau^(N-1) of the Muscle loss.
    public_batch: B, public examples per round.
    proj_dim: d.
    align_steps: T, alignment SGD steps per round; align_lr their step size.
    client_lr, client_momentum, batch_size, epochs: local task fine-tuning
      (E epochs of minibatch SGD, fresh optimizer each round).
    client_ids: optional explicit user-to-pool assignment.

  Returns:
    A FederatedAlgorithm with one :class:`~fedjax_sim.protocol.Pool` per
    architecture (``clients_per_round`` = pool size: all users join).
  """
  tasks = np.asarray(tasks, np.int32)
  num_users = len(tasks)
  if method not in METHODS:
    raise ValueError(f"method '{method}' unknown; use one of {METHODS}.")
  if not 1 <= M <= num_users - 1:
    raise ValueError(f"M={M} other users need 1 <= M <= C - 1 = {num_users - 1}.")
  if len(set(archs)) != len(archs):
    raise ValueError(f"architectures {list(archs)} repeat; list each MODEL_ZOO name once.")
  ids = list(client_ids) if client_ids is not None else assign_round_robin(num_users, len(archs))
  num_public = int(public_x.shape[0])
  if public_batch > num_public:
    raise ValueError(f"public_batch={public_batch} > {num_public} public examples.")
  public_x = jnp.asarray(public_x)
  task_of = jnp.asarray(tasks)
  _, bias_np = task_tables()
  task_bias = jnp.asarray(bias_np)
  branches = alignment_losses(M, tau_n, tau_n1)

  def make_pool(arch, members):
    um = user_model(arch, tuple(input_shape), proj_dim)

    def ce_loss(p, x, y, m, task):
      return masked_cross_entropy(um.logits(p, x) + task_bias[task], y, m)

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
        z = losses.l2_normalize(um.represent(p, x_prev))
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
      opt = client_optimizer(client_lr, client_momentum)
      res = local_train(lambda p, x, y, m, r: ce_loss(p, x, y, m, task), params, opt, data,
                        k_ft, epochs=epochs, batch_size=batch_size)
      params = res.params
      # (2) upload this round's public-batch representation matrix.
      x_pub = public_x[public_batch_indices(server.key, server.round, num_public, public_batch)]
      upload = losses.l2_normalize(um.represent(params, x_pub))
      metrics = {**res.metrics, "align_loss": align_loss, "aligned": aligned}
      return upload, MuscleClientState(params, task), metrics

    return Pool(
        name=arch, client_ids=np.asarray(members, np.int32), clients_per_round=len(members),
        client_update=client_update,
        init_client=lambda rng: MuscleClientState(um.init(rng), jnp.int32(0)),
        eval_params=lambda s, c: {"model": c.params, "bias": task_bias[c.task]},
        apply_fn=lambda p, x: um.logits(p["model"], x) + p["bias"])

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

  return FederatedAlgorithm(
      name="fedmuscle", init=init, init_client=None, client_update=None,
      server_update=server_update, eval_params=None, apply_fn=None, personalized=True,
      pools=pools)


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
