"""The reference round: :func:`fedjax_sim.round.make_round`'s round as a per-client loop.

:func:`make_reference_round` computes the same round as the round builder
with none of its machinery: no ``vmap``, no padding slots, no chunks, no
``shard_map``. It is what the vectorized round is tested against
(``tests/test_registry_equivalence.py``, every registered algorithm) and what
``bench/throughput.py`` times it against.

A round, for state ``s`` at round r:

1. ``k_sample, k_clients, k_server = seeding.round_subkeys(seed, r)`` (as the
   round builder); the cohort is ``sampler.sample(k_sample, r, s.sampler)``.
   Empty slots of a variable cohort (id -1, ``sampling.poisson``) are dropped.
   A model pool samples ``sampling.uniform(C_p, K_p)`` with
   ``fold_in(k_sample, crc32(pool name) & 0x7FFFFFFF)``; its local indices
   [0, C_p) map to global ids through ``Pool.client_ids``.
2. Each cohort member, one after another, runs the algorithm's
   ``client_update`` (jitted once per pool, called once per client) with key
   ``fold_in(k_clients, client_id)`` and ``ClientInfo(client_id, r, True)``.
3. The uploads are stacked in cohort order ([K, ...]) and the server update
   runs on them with weights = the clients' example counts and a
   ``ServerInfo`` without padding (valid all True). With a ``client_query``,
   ``info.query(q)`` asks the cohort one client at a time (a Python loop,
   unrolled in the trace) with the clients' NEW state, and stacks the
   answers [K, ...] in the same order.
4. The new per-client states are scattered back into ``s.clients``.

Cohort order: the round builder sorts the cohort by size (descending,
stable) before laying it out. An order-invariant server update gives the
same result for any order (up to float32 summation order);
``sort_by_size=True`` feeds the server the round builder's single-device
order (one chunk per device gives the same order on any number of devices),
for server updates whose state depends on the order of the uploads (e.g.
FedMDFG keeps last round's gradients [K, P] in slot order).

Axis legend: C clients, K cohort (real clients only here), N examples, P parameters.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import sampling, seeding
from fedjax_sim.protocol import ClientInfo, FederatedAlgorithm, ServerInfo
from fedjax_sim.client_data import ClientData, gather_clients
from fedjax_sim.round import SimState
from fedjax_sim.sampling import Sampler


class _PoolLoop(NamedTuple):
  """One pool of the loop (the whole population for a single-pool algorithm)."""
  name: str
  client_update: Callable
  client_ids: Optional[np.ndarray]  # int32 [C_p] global ids; None = all clients
  sampler: Sampler  # samples LOCAL indices in [0, C_p)


def _stack(trees: list) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _client(tree: Any, i) -> Any:
  return jax.tree.map(lambda a: a[i], tree)


def make_reference_round(algorithm: FederatedAlgorithm, sampler: Optional[Sampler] = None, *,
                         seed: int, sort_by_size: bool = False):
  """The round of :func:`fedjax_sim.round.make_round` as a per-client Python loop.

  Args:
    algorithm: the FederatedAlgorithm (single pool, or model pools: one loop
      per pool, the server update receives tuples, one entry per pool).
    sampler: the cohort sampler (K = ``sampler.clients_per_round``); ignored
      (may be None) for pooled algorithms.
    seed: run seed (Python int); round r uses ``seeding.round_subkeys(seed, r)``.
    sort_by_size: order each cohort by size (descending, stable), as the
      round builder does, before the clients run and the server sees them;
      False keeps the sampler's order.

  Returns:
    ``round_fn(state: SimState, data: ClientData [C, N, ...], *,
    sort_by_size=None) -> (SimState, metrics)``, one round per call (the
    keyword overrides the builder's ``sort_by_size`` for that call; both
    orders share the compiled functions). ``state`` as :func:`make_round`'s
    (``init_state``); metrics are float32 [1] (as ``make_round`` with
    ``rounds_per_call=1``): ``useful_examples`` (real examples trained)
    and ``padding_efficiency`` (useful / batch slots processed; only the
    last partial batch of each client is padding here), when the clients
    report ``useful_examples`` and ``batch_slots``.

  Raises:
    ValueError: no sampler for a single-pool algorithm, or model pools with a
      ``client_query`` (the round builder rejects them too).
  """
  pooled, default_sort = bool(algorithm.pools), sort_by_size
  if pooled:
    if algorithm.client_query is not None:
      raise ValueError(f"algorithm '{algorithm.name}' has model pools and a client_query; the "
                       "second client phase is supported for single-pool algorithms only.")
    pools = [_PoolLoop(p.name, p.client_update, np.asarray(p.client_ids, np.int32),
                       sampling.uniform(len(p.client_ids), p.clients_per_round))
             for p in algorithm.pools]
  else:
    if sampler is None:
      raise ValueError("make_reference_round needs a sampler for a single-pool algorithm.")
    pools = [_PoolLoop("", algorithm.client_update, None, sampler)]

  @jax.jit
  def plan(state: SimState, num_examples: jax.Array, sort: jax.Array):
    """Round keys, each pool's cohort (local indices and global ids, int32 [K_p]), broadcast.

    ``sort`` (bool []): order each cohort by size, descending, stable.
    """
    k_sample, k_clients, k_server = seeding.round_subkeys(seed, state.round)
    sampler_states = state.sampler if pooled else (state.sampler,)
    locals_, gids, new_samplers = [], [], []
    for pool, ss in zip(pools, sampler_states):
      key = seeding.pool_sample_key(k_sample, pool.name) if pooled else k_sample
      local, ss = pool.sampler.sample(key, state.round, ss)
      gid = local if pool.client_ids is None else jnp.asarray(pool.client_ids)[local]
      order = jnp.where(sort, jnp.argsort(-num_examples[gid], stable=True),
                        jnp.arange(gid.shape[0]))
      local, gid = local[order], gid[order]
      locals_.append(local)
      gids.append(gid)
      new_samplers.append(ss)
    return (tuple(locals_), tuple(gids), k_clients, k_server, tuple(new_samplers),
            algorithm.broadcast(state.server))

  def client_fn(update):
    @jax.jit
    def one_client(bcast, pool_clients, data, local, gid, k_clients, round_):
      """ONE client: its data slice [N, ...] and state, key fold_in(k_clients, id)."""
      info = ClientInfo(gid, round_, jnp.bool_(True))
      return update(bcast, _client(pool_clients, local), gather_clients(data, gid),
                    jax.random.fold_in(k_clients, gid), info)
    return one_client

  client_fns = [client_fn(pool.client_update) for pool in pools]

  def query_fn(new_cstates, data: ClientData, gids: jax.Array, round_: jax.Array):
    """``info.query``: every cohort member answers in turn (new state), stacked [K, ...]."""
    def ask(q):
      return _stack([algorithm.client_query(q, _client(new_cstates, i), gather_clients(data, gids[i]),
                                            ClientInfo(gids[i], round_, jnp.bool_(True)))
                     for i in range(gids.shape[0])])
    return ask

  @jax.jit
  def finish(state: SimState, data: ClientData, uploads, new_cstates, locals_, gids, k_server,
             new_samplers):
    """The server update on the stacked uploads, then the scatter of client state."""
    pool_states = state.clients if pooled else (state.clients,)
    weights, infos, clients = [], [], []
    for p in range(len(pools)):
      n = data.num_examples[gids[p]]
      ask = None
      if algorithm.client_query is not None:
        ask = query_fn(new_cstates[p], data, gids[p], state.round)
      weights.append(n.astype(jnp.float32))
      infos.append(ServerInfo(state.round, gids[p], n, jnp.ones(gids[p].shape, bool), ask))
      clients.append(jax.tree.map(lambda a, u: a.at[locals_[p]].set(u), pool_states[p],
                                  new_cstates[p]))
    if pooled:
      server, _ = algorithm.server_update(state.server, tuple(uploads), tuple(weights),
                                          tuple(infos), k_server)
      return SimState(state.round + 1, server, tuple(clients), new_samplers)
    server, _ = algorithm.server_update(state.server, uploads[0], weights[0], infos[0], k_server)
    return SimState(state.round + 1, server, clients[0], new_samplers[0])

  def round_fn(state: SimState, data: ClientData, *, sort_by_size: Optional[bool] = None):
    sort = jnp.bool_(default_sort if sort_by_size is None else sort_by_size)
    locals_, gids, k_clients, k_server, new_samplers, bcast = plan(state, data.num_examples, sort)
    # A variable cohort (sampling.poisson) marks empty slots -1: only the real clients run.
    keep = [np.asarray(loc) >= 0 for loc in locals_]
    locals_ = tuple(jnp.asarray(np.asarray(loc)[k]) for loc, k in zip(locals_, keep))
    gids = tuple(jnp.asarray(np.asarray(g)[k]) for g, k in zip(gids, keep))
    pool_states = state.clients if pooled else (state.clients,)
    uploads, new_cstates, cmetrics = [], [], []
    for p, one_client in enumerate(client_fns):
      outs = [one_client(bcast, pool_states[p], data, np.int32(local), np.int32(gid), k_clients,
                         state.round)
              for local, gid in zip(np.asarray(locals_[p]), np.asarray(gids[p]))]
      up, cs, m = (_stack([o[i] for o in outs]) for i in range(3))
      uploads.append(up)
      new_cstates.append(cs)
      cmetrics.append(m)
    state = finish(state, data, tuple(uploads), tuple(new_cstates), locals_, gids, k_server,
                   new_samplers)
    metrics = {}
    if all("useful_examples" in m and "batch_slots" in m for m in cmetrics):
      useful = sum(jnp.sum(m["useful_examples"]) for m in cmetrics)
      slots = sum(jnp.sum(m["batch_slots"]) for m in cmetrics)
      metrics = {"useful_examples": useful,
                 "padding_efficiency": useful / jnp.maximum(slots, 1.0)}
    return state, {k: jnp.asarray(v, jnp.float32)[None] for k, v in metrics.items()}

  return round_fn
