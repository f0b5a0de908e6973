"""The ``FederatedAlgorithm`` protocol and the shared local-training loop.

An algorithm is a NamedTuple of pure functions (in the spirit of
``optax.GradientTransformation`` and FedJAX's ``FederatedAlgorithm``). Client
code is written for ONE client; the round builder (:mod:`fedjax_sim.round`)
adds the client axis with ``vmap`` and shards it over devices. An algorithm
never sees the mesh and never loops over clients in Python.

Axis legend used in docstrings: C clients, K cohort (clients per round, padded),
N examples per client, B batch, D embedding.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.client_data import ClientData

PyTree = Any


class ClientInfo(NamedTuple):
  """What a client knows about its slot in the round (all int32/bool scalars)."""
  client_id: jax.Array  # int32 []: index into the C clients.
  round: jax.Array  # int32 []: 0-based round number.
  valid: jax.Array  # bool []: False for the zero-weight padding slots.


class ServerInfo(NamedTuple):
  """Cohort facts passed to the server update (K = padded cohort size).

  ``query`` is the round's second client phase (None unless the algorithm
  defines ``client_query``): ``query(q) -> pytree [K, ...]`` asks every
  cohort slot ``client_query(q, client_state, data, info)`` with the same
  layout, chunking and sharding as the client update (padding slots answer
  too; mask them with ``valid``). The server update may call it any number of
  times, also inside ``lax.while_loop`` (FedMDFG's step-size line search).
  """
  round: jax.Array  # int32 []
  client_ids: jax.Array  # int32 [K]; padding slots hold a valid id but valid=False.
  num_examples: jax.Array  # int32 [K]; 0 for padding slots.
  valid: jax.Array  # bool [K]
  query: Optional[Callable[[Any], Any]] = None


class Pool(NamedTuple):
  """A model pool: clients that share one architecture and one client update.

  Model-heterogeneous methods (FedRE, FedMuscle, CODIST) list their pools in
  ``FederatedAlgorithm.pools``. Each pool is vmapped on its own; one round
  covers every pool in one jitted program. A client may belong to several
  pools (CODIST: high-capacity clients train both models).

  Attributes:
    name: pool name (metrics are also reported as ``<name>/<metric>``).
    client_ids: int [C_p] (host NumPy), the global ids of the pool's clients.
    clients_per_round: K_p, sampled uniformly without replacement per round.
    client_update: as ``FederatedAlgorithm.client_update``, for this pool.
    init_client: ``rng -> client_state`` for ONE client of this pool; the
      engine stacks it to [C_p, ...] (``SimState.clients[p]``).
    eval_params: ``(server_state, client_state) -> params`` for this pool.
    apply_fn: ``(params, x [B, ...]) -> logits`` of this pool's model.
    global_model: True when the pool's model is one global model (its
      ``eval_params`` ignores the client state): it is then also evaluated on
      the global test set (``<pool>/global_test_accuracy``).
  """
  name: str
  client_ids: Any
  clients_per_round: int
  client_update: Callable[..., tuple[PyTree, PyTree, dict]]
  init_client: Callable[[jax.Array], PyTree]
  eval_params: Callable[[PyTree, PyTree], PyTree]
  apply_fn: Callable[[PyTree, jax.Array], jax.Array]
  global_model: bool = False


class FederatedAlgorithm(NamedTuple):
  """A federated algorithm as pure functions.

  Attributes:
    name: registry name.
    init: ``rng -> server_state``.
    init_client: ``rng -> client_state`` for ONE client (persistent across
      rounds: local models, control variates, stored updates). Return ``()``
      for stateless clients. The engine stacks it to [C, ...].
    client_update: ``(broadcast, client_state, data, rng, info) -> (upload,
      client_state, metrics)`` for ONE client; ``data`` is that client's
      :class:`ClientData` slice ([N, ...]); ``metrics`` a dict of float32
      scalars (``loss`` at least).
    server_update: ``(server_state, uploads, weights, info, rng) ->
      (server_state, metrics)``; ``uploads`` stacked [K, ...], ``weights``
      float32 [K] (number of training examples, 0 for padding slots).
    eval_params: ``(server_state, client_state) -> params`` the model client
      i is evaluated with (the global model unless ``personalized``).
    apply_fn: ``(params, x [B, ...]) -> logits [B, num_classes]``.
    broadcast: ``server_state -> broadcast`` (what clients receive).
    personalized: True when each client keeps its own model (local training,
      personalized FL); global test accuracy is then measured on the union of
      the clients' own test splits.
    evaluate: optional ``(server_state, client_states, data: FederatedData)
      -> dict[str, float]`` replacing the built-in classification evaluation
      (e.g. representation metrics for self-supervised methods).
    pools: model pools (see :class:`Pool`); when non-empty, the top-level
      ``client_update``/``init_client``/``eval_params``/``apply_fn`` are unused
      (set them to None) and ``server_update`` receives tuples, one entry
      per pool: ``(server_state, uploads, weights, infos, rng)``.
    client_query: optional second client phase, ``(q, client_state, data,
      info) -> pytree`` for ONE client (``client_state`` as returned by this
      round's ``client_update``). The server update then finds
      ``info.query`` (see :class:`ServerInfo`) and may ask the cohort
      questions after the uploads, inside the same jitted round (e.g.
      FedMDFG asks each client's loss at candidate models). Single-pool
      algorithms only.
  """
  name: str
  init: Callable[[jax.Array], PyTree]
  init_client: Callable[[jax.Array], PyTree]
  client_update: Callable[..., tuple[PyTree, PyTree, dict]]
  server_update: Callable[..., tuple[PyTree, dict]]
  eval_params: Callable[[PyTree, PyTree], PyTree]
  apply_fn: Callable[[PyTree, jax.Array], jax.Array]
  broadcast: Callable[[PyTree], PyTree] = lambda s: s
  personalized: bool = False
  pools: tuple = ()
  evaluate: Optional[Callable[..., dict]] = None
  client_query: Optional[Callable[..., Any]] = None


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the real (mask=True) rows; 0 if none.

  Args: logits float32 [B, L]; labels int32 [B]; mask bool [B].
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  m = mask.astype(logits.dtype)
  return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


class LocalTrainResult(NamedTuple):
  params: PyTree
  metrics: dict  # loss (mean over steps taken), steps, useful_examples, batch_slots


def num_local_steps(num_examples: jax.Array, *, epochs: int, batch_size: int,
                    local_steps: int = 0) -> jax.Array:
  """Steps a client takes: E * ceil(n / B), or ``local_steps`` if > 0; 0 if n = 0."""
  per_epoch = (num_examples + batch_size - 1) // batch_size
  steps = jnp.int32(local_steps) if local_steps > 0 else epochs * per_epoch
  return jnp.where(num_examples > 0, steps, 0).astype(jnp.int32)


def local_train(loss_fn: Callable[..., jax.Array], params: PyTree,
                optimizer: optax.GradientTransformation, data: ClientData, rng: jax.Array, *,
                epochs: int = 1, batch_size: int = 10, local_steps: int = 0) -> LocalTrainResult:
  """Local SGD for ONE client: E epochs of minibatches (or a fixed step count).

  Each epoch visits the client's real examples once in a fresh random order
  (key ``fold_in(rng, epoch)``), in ceil(n/B) batches; the last batch may be
  partial (its padded rows are masked out of the loss). The loop trip count is
  the client's own step count, so under ``vmap`` a chunk of clients costs the
  largest member's steps; padded steps never run for a lone client and are
  inert under ``vmap`` (``while_loop`` selects the old carry).

  Args:
    loss_fn: ``(params, x [B, ...], y int32 [B], mask bool [B], rng) -> scalar``.
    params: initial model parameters.
    optimizer: the client optimizer (state is fresh each round).
    data: one client's ClientData slice: x [N, ...], y [N], mask [N], num_examples [].
      N must be a multiple of batch_size (``pack(..., multiple=B)`` does it).
    rng: PRNG key for shuffling (and the loss's own randomness).
    epochs: E, local epochs (used when local_steps == 0).
    batch_size: B.
    local_steps: if > 0, a fixed number of steps (cycling through reshuffled epochs).

  Returns:
    LocalTrainResult(params, metrics) with float32 scalars ``loss`` (mean
    minibatch loss), ``steps``, ``useful_examples`` and ``batch_slots`` (steps * B).
  """
  n_rows = data.y.shape[0]
  if n_rows % batch_size:
    raise ValueError(f"client arrays have N={n_rows} rows, not a multiple of batch_size="
                     f"{batch_size}; pack with multiple=batch_size.")
  n = data.num_examples
  per_epoch = jnp.maximum((n + batch_size - 1) // batch_size, 1)
  steps = num_local_steps(n, epochs=epochs, batch_size=batch_size, local_steps=local_steps)
  num_perms = local_steps if local_steps > 0 else epochs
  shuffle_key, loss_key = jax.random.split(rng)

  def epoch_perm(e):
    # Real rows first in random order, padding rows last. Row i's score depends
    # only on (key, epoch, i), not on N, so padding never changes the order.
    ekey = jax.random.fold_in(shuffle_key, e)
    scores = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(ekey, i)))(
        jnp.arange(n_rows))
    return jnp.argsort(jnp.where(data.mask, scores, 2.0)).astype(jnp.int32)

  perms = jax.vmap(epoch_perm)(jnp.arange(num_perms))  # [E, N]
  grad_fn = jax.value_and_grad(loss_fn)

  def body(s, carry):
    p, opt_state, loss_sum, useful = carry
    epoch, pos = s // per_epoch, s % per_epoch
    start = pos * batch_size
    idx = jax.lax.dynamic_slice(perms[epoch % num_perms], (start,), (batch_size,))
    bmask = (start + jnp.arange(batch_size)) < n
    loss, grads = grad_fn(p, data.x[idx], data.y[idx], bmask, jax.random.fold_in(loss_key, s))
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state, loss_sum + loss,
            useful + jnp.sum(bmask))

  init = (params, optimizer.init(params), jnp.float32(0.0), jnp.int32(0))
  params, _, loss_sum, useful = jax.lax.fori_loop(0, steps, body, init)
  stepsf = steps.astype(jnp.float32)
  return LocalTrainResult(params, {
      "loss": loss_sum / jnp.maximum(stepsf, 1.0),
      "steps": stepsf,
      "useful_examples": useful.astype(jnp.float32),
      "batch_slots": stepsf * batch_size,
  })


def tree_weighted_mean(tree: PyTree, weights: jax.Array) -> PyTree:
  """Weighted mean over the leading K axis of every leaf: sum_k w_k x_k / sum_k w_k."""
  total = jnp.maximum(jnp.sum(weights), 1e-12)
  return jax.tree.map(
      lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1) / total.astype(x.dtype), tree)


def client_optimizer(lr: float, momentum: float = 0.0, decay: float = 1.0,
                     round: Optional[jax.Array] = None) -> optax.GradientTransformation:
  """Client SGD with a per-round exponential decay lr * decay**round.

  No Python branch on traced values, so lr, momentum and decay may be traced
  (vectorized sweeps vmap over them).
  """
  eta = lr if round is None else lr * decay ** jnp.asarray(round, jnp.float32)
  if isinstance(momentum, (int, float)) and momentum == 0:
    momentum = None  # a literal 0: plain SGD, no momentum buffer to carry per step
  return optax.sgd(eta, momentum=momentum)
