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
from fedjax_sim import text

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
    local: optional :class:`LocalSpec` of this pool's client update in step form (its
      ``begin`` / ``finish`` receive the WHOLE broadcast, as ``client_update`` does); needed
      by the streaming schedule.
  """
  name: str
  client_ids: Any
  clients_per_round: int
  client_update: Callable[..., tuple[PyTree, PyTree, dict]]
  init_client: Callable[[jax.Array], PyTree]
  eval_params: Callable[[PyTree, PyTree], PyTree]
  apply_fn: Callable[[PyTree, jax.Array], jax.Array]
  global_model: bool = False
  local: Optional["LocalSpec"] = None


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
    local: optional :class:`LocalSpec`, the client update in step form
      (``client_update`` is then ``client_update_from_local(local)``); needed
      by the streaming schedule (``make_round(..., schedule="stream")``).

  A ``server_update`` marked with :func:`reads_weighted_mean` reads its uploads only as their
  weighted mean; the streaming schedule then never stacks them (see there).
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
  local: Optional["LocalSpec"] = None


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the real (mask=True) rows; 0 if none.

  Args: logits float32 [B, L]; labels int32 [B]; mask bool [B]. A sequence task
  (logits [B, T, V], labels int32 [B, T]) gets the mean over the tokens that count:
  real rows' targets >= 0 (:data:`fedjax_sim.text.IGNORE` targets are skipped).
  """
  if labels.ndim > 1:
    w = text.token_weights(labels, mask)
    return jnp.sum(text.token_cross_entropy(logits, labels) * w) / jnp.maximum(jnp.sum(w), 1.0)
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


class LocalPlan(NamedTuple):
  """ONE client's batch schedule for local training (see :func:`local_plan`)."""
  perms: jax.Array  # int32 [E', N]: per epoch, real rows in random order, padding rows last
  loss_key: jax.Array  # PRNG key; step s's loss gets fold_in(loss_key, s)
  num_examples: jax.Array  # int32 []: n, real examples
  steps: jax.Array  # int32 []: steps this client takes (num_local_steps)


class LocalCarry(NamedTuple):
  """The state local SGD carries from one step to the next (ONE client)."""
  params: PyTree
  opt_state: PyTree
  loss_sum: jax.Array  # float32 []: sum of the minibatch losses so far
  useful: jax.Array  # int32 []: real examples trained so far


def local_plan(data: ClientData, rng: jax.Array, *, epochs: int, batch_size: int,
               local_steps: int = 0) -> LocalPlan:
  """The batch order of ONE client: one random permutation per epoch.

  Epoch e's order is drawn with ``fold_in(shuffle_key, e)`` where
  ``shuffle_key, loss_key = split(rng)``; row i's score depends only on (key,
  epoch, i), not on N, so padding never changes the order.

  Args:
    data: one client's ClientData slice (x [N, ...], y [N], mask [N], num_examples []).
    rng: the client's key.
    epochs, batch_size, local_steps: as :func:`local_train`.

  Raises:
    ValueError: N is not a multiple of ``batch_size``.
  """
  n_rows = data.y.shape[0]
  if n_rows % batch_size:
    raise ValueError(f"client arrays have N={n_rows} rows, not a multiple of batch_size="
                     f"{batch_size}; pack with multiple=batch_size.")
  n = data.num_examples
  steps = num_local_steps(n, epochs=epochs, batch_size=batch_size, local_steps=local_steps)
  num_perms = local_steps if local_steps > 0 else epochs
  shuffle_key, loss_key = jax.random.split(rng)

  def epoch_perm(e):
    # Real rows first in random order, padding rows last.
    ekey = jax.random.fold_in(shuffle_key, e)
    scores = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(ekey, i)))(
        jnp.arange(n_rows))
    return jnp.argsort(jnp.where(data.mask, scores, 2.0)).astype(jnp.int32)

  perms = jax.vmap(epoch_perm)(jnp.arange(num_perms))  # [E', N]
  return LocalPlan(perms, loss_key, n, steps)


def local_batch(plan: LocalPlan, s: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Rows of step ``s``: (idx int32 [B], bmask bool [B]); the last batch of an epoch may be
  partial (bmask False on its padded rows)."""
  n = plan.num_examples
  per_epoch = jnp.maximum((n + batch_size - 1) // batch_size, 1)
  num_perms = plan.perms.shape[0]
  epoch, pos = s // per_epoch, s % per_epoch
  start = pos * batch_size
  idx = jax.lax.dynamic_slice(plan.perms[epoch % num_perms], (start,), (batch_size,))
  bmask = (start + jnp.arange(batch_size)) < n
  return idx, bmask


def local_step(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation,
               carry: LocalCarry, x: jax.Array, y: jax.Array, bmask: jax.Array,
               rng: jax.Array) -> LocalCarry:
  """One SGD step of ONE client: the arithmetic :func:`local_train`'s loop and the streaming
  schedule (:mod:`fedjax_sim.stream`) share.

  Args:
    loss_fn: ``(params, x [B, ...], y int32 [B], mask bool [B], rng) -> scalar``.
    optimizer: the client optimizer.
    carry: the client's :class:`LocalCarry`.
    x, y, bmask: the step's batch ([B, ...], int32 [B], bool [B]).
    rng: the step's loss key (``fold_in(plan.loss_key, s)``).
  """
  loss, grads = jax.value_and_grad(loss_fn)(carry.params, x, y, bmask, rng)
  updates, opt_state = optimizer.update(grads, carry.opt_state, carry.params)
  return LocalCarry(optax.apply_updates(carry.params, updates), opt_state,
                    carry.loss_sum + loss, carry.useful + jnp.sum(bmask))


def local_metrics(carry: LocalCarry, steps: jax.Array, batch_size: int) -> dict:
  """float32 scalars ``loss`` (mean minibatch loss), ``steps``, ``useful_examples``,
  ``batch_slots`` (steps * B) of a finished client."""
  stepsf = steps.astype(jnp.float32)
  return {
      "loss": carry.loss_sum / jnp.maximum(stepsf, 1.0),
      "steps": stepsf,
      "useful_examples": carry.useful.astype(jnp.float32),
      "batch_slots": stepsf * batch_size,
  }


def local_train(loss_fn: Callable[..., jax.Array], params: PyTree,
                optimizer: optax.GradientTransformation, data: ClientData, rng: jax.Array, *,
                epochs: int = 1, batch_size: int = 10, local_steps: int = 0) -> LocalTrainResult:
  """Local SGD for ONE client: E epochs of minibatches (or a fixed step count).

  Each epoch visits the client's real examples once in a fresh random order
  (key ``fold_in(rng, epoch)``), in ceil(n/B) batches; the last batch may be
  partial (its padded rows are masked out of the loss). The loop trip count is
  the client's own step count, so under ``vmap`` a chunk of clients costs the
  largest member's steps; padded steps never run for a lone client and are
  inert under ``vmap`` (``while_loop`` selects the old carry). Each step is
  :func:`local_step` on the batch :func:`local_batch` picks from :func:`local_plan`.

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

  Raises:
    ValueError: N is not a multiple of ``batch_size``.
  """
  plan = local_plan(data, rng, epochs=epochs, batch_size=batch_size, local_steps=local_steps)

  def body(s, carry):
    idx, bmask = local_batch(plan, s, batch_size)
    return local_step(loss_fn, optimizer, carry, data.x[idx], data.y[idx], bmask,
                      jax.random.fold_in(plan.loss_key, s))

  init = LocalCarry(params, optimizer.init(params), jnp.float32(0.0), jnp.int32(0))
  carry = jax.lax.fori_loop(0, plan.steps, body, init)
  return LocalTrainResult(carry.params, local_metrics(carry, plan.steps, batch_size))


class LocalSpec(NamedTuple):
  """Client work in step form: the engine owns local training, the algorithm supplies the
  loss and its pre- and post-processing.

  :func:`client_update_from_local` turns it into an ordinary ``client_update``
  (``begin``, :func:`local_train`, ``finish``), so a step-form algorithm runs
  under every schedule; the streaming schedule (``make_round(...,
  schedule="stream")``, :mod:`fedjax_sim.stream`) calls the pieces itself and
  runs :func:`local_step` one step at a time in W vmapped slots.

  Attributes:
    begin: ``(broadcast, client_state, data, rng, info) -> (params0, aux)``:
      the starting params and a per-client pytree the loss needs (e.g.
      FedProx's global params; ``()`` if none), for ONE client.
    loss: ``(params, aux, x [B, ...], y int32 [B], mask bool [B], rng) -> scalar``.
    optimizer: ``info -> optax.GradientTransformation`` (state fresh per round).
    finish: ``(broadcast, client_state, aux, params, train_metrics, data, info)
      -> (upload, client_state, metrics)``; ``params`` are the trained params,
      ``train_metrics`` :func:`local_metrics`'s dict.
    epochs: E.  batch_size: B.  local_steps: fixed steps instead of epochs (> 0).
    prepare: ``(broadcast, client_state, data, info) -> pytree`` or None: per-client work on
      the client's whole data before local training (q-FFL's loss of the global model).
      When given, ``begin`` takes its value as a sixth argument. The streaming schedule runs
      it for a device's whole queue (in chunks of W clients) before the slots start, not
      at every refill, where ``begin`` and ``finish`` run for all W slots.
  """
  begin: Callable[..., tuple[PyTree, PyTree]]
  loss: Callable[..., jax.Array]
  optimizer: Callable[[ClientInfo], optax.GradientTransformation]
  finish: Callable[..., tuple[PyTree, PyTree, dict]]
  epochs: int = 1
  batch_size: int = 10
  local_steps: int = 0
  prepare: Optional[Callable[..., PyTree]] = None


def client_update_from_local(spec: LocalSpec) -> Callable[..., tuple[PyTree, PyTree, dict]]:
  """The ordinary ``client_update`` of a :class:`LocalSpec`: begin, local_train, finish."""
  def client_update(broadcast, client_state, data, rng, info):
    extra = () if spec.prepare is None else (spec.prepare(broadcast, client_state, data, info),)
    params0, aux = spec.begin(broadcast, client_state, data, rng, info, *extra)
    res = local_train(lambda p, x, y, m, r: spec.loss(p, aux, x, y, m, r), params0,
                      spec.optimizer(info), data, rng, epochs=spec.epochs,
                      batch_size=spec.batch_size, local_steps=spec.local_steps)
    return spec.finish(broadcast, client_state, aux, res.params, res.metrics, data, info)
  return client_update


def reads_weighted_mean(server_update: Callable) -> Callable:
  """Marks ``server_update`` as reading its uploads ONLY as ``tree_weighted_mean(uploads,
  weights)`` (FedAvg, FedOpt, FedProx).

  The streaming schedule then folds each finished client into a running weighted sum and
  calls ``server_update`` with the mean as ONE upload ([1, ...], weights [1.0]), so a round's
  memory does not grow with K (the chunked schedule still stacks [K, ...]). The mark is an
  attribute of the function object, so a wrapper that replaces ``server_update`` (a DP
  aggregator clipping each upload, ``alg._replace(server_update=...)``) drops it and gets the
  stacked uploads again.
  """
  server_update.reads_weighted_mean = True
  return server_update


def is_mean_reader(server_update: Callable) -> bool:
  """True if ``server_update`` was marked by :func:`reads_weighted_mean`."""
  return bool(getattr(server_update, "reads_weighted_mean", False))


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
