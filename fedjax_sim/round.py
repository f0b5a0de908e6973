"""The round builder: one federated round (or several) as ONE jitted program.

``make_round`` returns ``round_fn(state, data) -> (state, metrics)`` that

1. derives the round key ``seeding.round_key(seed, round)`` (the run's
   ``rounds`` stream, independent of the init streams);
2. samples the cohort (a :class:`~fedjax_sim.sampling.Sampler`);
3. sorts it by client size and lays it out in chunks of similar clients,
   padded with zero-weight slots to a multiple of devices x chunk size;
4. gathers the cohort's data and per-client state on device (no host copies);
5. runs ``vmap(client_update)`` over each chunk (``lax.map`` over chunks),
   inside ``shard_map`` over the mesh axis ``clients``;
6. runs the server update on the stacked uploads (an algorithm with a
   ``client_query`` may ask the cohort again from there: ``ServerInfo.query``);
7. scatters the new per-client state back into the [C, ...] state arrays;

and fuses ``rounds_per_call`` rounds with ``lax.scan``.

Client keys are ``fold_in(round_key, client_id)``: a client's randomness does
not depend on its slot, its chunk or its device, so the vectorized round
equals a per-client loop and 1 device equals 8.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_sim.protocol import ClientInfo, FederatedAlgorithm, ServerInfo
from fedjax_sim.client_data import ClientData, gather_clients
from fedjax_sim import sampling, seeding, stream
from fedjax_sim.sampling import Sampler

CLIENTS_AXIS = "clients"


class SimState(NamedTuple):
  """Everything a simulation carries between rounds (a pytree of arrays).

  Attributes:
    round: int32 []: number of rounds completed.
    server: the algorithm's server state.
    clients: per-client state stacked to [C, ...] (``()`` when stateless);
      with model pools, a tuple with one [C_p, ...] stack per pool.
    sampler: the sampler's state (a tuple per pool with model pools).
  """
  round: jax.Array
  server: Any
  clients: Any
  sampler: Any


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices, axis name ``clients``."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={n} but {len(devices)} devices are visible.")
  return Mesh(np.array(devices[:n]), (CLIENTS_AXIS,))


def init_state(algorithm: FederatedAlgorithm, sampler: Optional[Sampler], num_clients: int,
               seed: int, mesh: Optional[Mesh] = None) -> SimState:
  """Initial state: server from the ``init`` stream, client i from ``client_init`` folded with i.

  Keys: ``seeding.jax_key(seed, "init")`` and
  ``fold_in(seeding.jax_key(seed, "client_init"), i)`` (see
  :mod:`fedjax_sim.seeding`); both are independent of the round keys.

  The state is placed replicated on ``mesh`` (default: all local devices, as
  :func:`make_round`'s default), exactly as the round function returns it, so
  the first and later rounds share one executable.
  """
  server = algorithm.init(seeding.jax_key(seed, "init"))
  ckey = seeding.jax_key(seed, "client_init")
  init_clients = lambda init, ids: jax.vmap(lambda i: init(jax.random.fold_in(ckey, i)))(ids)
  if algorithm.pools:  # one stacked state per pool, client keys by global id
    clients = tuple(init_clients(p.init_client, jnp.asarray(p.client_ids)) for p in algorithm.pools)
    samplers = tuple(() for _ in algorithm.pools)
  else:
    clients = init_clients(algorithm.init_client, jnp.arange(num_clients))
    samplers = sampler.init()
  state = SimState(jnp.int32(0), server, clients, samplers)
  return replicate(state, mesh or make_mesh())


class CohortLayout(NamedTuple):
  """Static layout of the padded cohort."""
  cohort: int  # K, real clients per round
  padded: int  # K_pad, multiple of devices * chunk
  chunk: int  # clients vmapped together
  devices: int


def cohort_layout(clients_per_round: int, num_devices: int,
                  chunk_size: Optional[int]) -> CohortLayout:
  per_dev = math.ceil(clients_per_round / num_devices)
  chunk = per_dev if not chunk_size else min(chunk_size, per_dev)
  per_dev = math.ceil(per_dev / chunk) * chunk
  return CohortLayout(clients_per_round, per_dev * num_devices, chunk, num_devices)


def _slot_order(layout: CohortLayout) -> np.ndarray:
  """Maps layout slots to size-sorted positions: device d holds chunks d, d+D, d+2D, ...

  So every device gets a similar mix of large and small clients, and every
  chunk holds clients of similar size.
  """
  n_chunks_dev = layout.padded // (layout.devices * layout.chunk)
  pos = np.arange(layout.padded).reshape(n_chunks_dev, layout.devices, layout.chunk)
  return pos.transpose(1, 0, 2).reshape(-1)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


class _PoolPlan(NamedTuple):
  """Static plan of one pool inside the round (see :class:`~fedjax_sim.protocol.Pool`)."""
  client_update: Any
  client_ids: Optional[jax.Array]  # int32 [C_p] global ids; None = all clients (single pool)
  sampler: Sampler  # samples LOCAL indices in [0, C_p)
  layout: CohortLayout
  slot_order: jax.Array


def make_round(algorithm: FederatedAlgorithm, sampler: Optional[Sampler] = None, *,
               seed: Optional[int],
               mesh: Optional[Mesh] = None, chunk_size: Optional[int] = None,
               rounds_per_call: int = 1, sort_by_size: bool = True, donate: bool = True,
               jit: bool = True, schedule: str = "chunked", slots: Optional[int] = None,
               shard_data: bool = False):
  """Builds the jitted round function.

  Args:
    algorithm: the FederatedAlgorithm. With ``algorithm.pools`` (model pools),
      every pool samples its own ``clients_per_round`` clients uniformly from
      its members, is vmapped on its own, and the server update receives
      tuples (one entry per pool) of uploads, weights and infos.
    sampler: cohort sampler (K = sampler.clients_per_round); ignored (may be
      None) for pooled algorithms.
    seed: run seed (Python int, or a traced int32 scalar); round r uses
      ``seeding.round_subkeys(seed, r)``. ``None``: the seed is a third,
      traced argument of ``round_fn`` (int32 []), so runs of several seeds
      share one compiled program.
    mesh: a 1-D mesh with axis ``clients`` (default: all local devices).
    chunk_size: clients vmapped together; chunks run one after another via
      ``lax.map`` (bounds memory, and with size sorting cuts padded steps).
      Default: all of a device's clients in one vmap.
    rounds_per_call: rounds fused by ``lax.scan`` in one call.
    sort_by_size: order the cohort by size before chunking.
    donate: donate the input state's buffers.
    jit: False returns the un-jitted function (for tests and tracing).
    schedule: ``"chunked"`` (size-sorted chunks, ``lax.map`` over chunks) or
      ``"stream"`` (clients stream through ``slots`` vmapped slots in one
      ``while_loop`` per device, :mod:`fedjax_sim.stream`; single-model algorithms with
      ``local``; ``chunk_size`` is then unused).
      ``"auto"``: ``"stream"`` for the algorithms it supports with a fixed-size cohort,
      else ``"chunked"``.
    slots: W for ``schedule="stream"`` (default :func:`fedjax_sim.stream.default_slots`).
    shard_data: shard the padded client data along C over the mesh's ``clients`` axis
      instead of replicating it (for data larger than one device): each round gathers its
      cohort's rows from the shards (XLA's distributed gather) and hands every device only
      its clients' rows. C must be a multiple of the device count
      (:func:`fedjax_sim.client_data.pad_clients`); chunked schedule, padded storage.

  Returns:
    ``round_fn(state: SimState, data: ClientData [C, N, ...]) -> (SimState,
    metrics)`` (``round_fn(state, data, seed)`` when ``seed`` is None);
    every metric is float32 [rounds_per_call]. Metrics: client
    metrics averaged with example weights (``loss``, ...; per pool also
    ``<pool>/loss``), ``server/...`` metrics, ``padding_efficiency`` (useful
    / processed examples, when clients report ``useful_examples`` and
    ``batch_slots``; streamed: useful / (slot-steps x B)).

  Raises:
    ValueError: an unknown ``schedule``, or ``schedule="stream"`` for an
      algorithm or mesh it does not support (see :mod:`fedjax_sim.stream`).
  """
  mesh = mesh or make_mesh()
  if shard_data and schedule != "chunked":
    raise ValueError(f"shard_data=True needs schedule='chunked' (got {schedule!r}).")
  devices = mesh.devices.size
  pooled = bool(algorithm.pools)

  def plan(update, ids, smp):
    lay = cohort_layout(smp.clients_per_round, devices, chunk_size)
    return _PoolPlan(update, ids, smp, lay, jnp.asarray(_slot_order(lay)))

  if pooled:
    plans = [plan(p.client_update, jnp.asarray(p.client_ids, jnp.int32),
                  sampling.uniform(len(p.client_ids), p.clients_per_round))
             for p in algorithm.pools]
    names = [p.name for p in algorithm.pools]
  else:
    if sampler is None:
      raise ValueError("make_round needs a sampler for a single-pool algorithm.")
    plans, names = [plan(algorithm.client_update, None, sampler)], [""]
  if schedule not in ("chunked", "stream", "auto"):
    raise ValueError(f"schedule={schedule!r}; use 'chunked', 'stream' or 'auto'.")
  if schedule == "auto":  # the stream where it applies (bench/RESULTS.md), else chunks
    fixed = sampler is None or getattr(sampler, "rate", None) is None
    schedule = "stream" if fixed and stream.supported(algorithm) is None else "chunked"
  stream_phases = None
  if schedule == "stream" and sampler is not None and sampler.rate is not None:
    raise ValueError("schedule='stream' needs a fixed-size cohort; the Poisson sampler's "
                     "varies: use schedule='chunked' or another --config.sampler.")
  if schedule == "stream":
    stream_phases = stream.make_stream_phases(algorithm, sampler, slots=slots, mesh=mesh,
                                              sort_by_size=sort_by_size)

  def sharded_block(pl: _PoolPlan, client_fn):
    """``client_fn(shared, cstate, data, rng, info)`` over the cohort, sharded and chunked."""
    def client_block(shared, data, cstate, rngs, infos, num_ex):
      """Runs on one device: [K_local, ...] -> chunks of vmapped clients.

      The device holds the whole (replicated) dataset and gathers each chunk's
      rows inside the chunk loop, so memory scales with the chunk, not the cohort.
      With ``shard_data``, ``data`` is instead this device's cohort rows [K_local, N, ...]
      (gathered from the shards before ``shard_map``), chunked alongside the clients.
      """
      vfn = jax.vmap(client_fn, in_axes=(None, 0, 0, 0, 0))

      def run_chunk(cstate, rngs, infos, num_ex, rows=None):
        cdata = gather_clients(data, infos.client_id) if rows is None else rows
        cdata = cdata._replace(num_examples=num_ex,
                               mask=cdata.mask & infos.valid[:, None])
        return vfn(shared, cstate, cdata, rngs, infos)

      k_local = infos.valid.shape[0]
      n_chunks = k_local // pl.layout.chunk
      args = (cstate, rngs, infos, num_ex) + ((data,) if shard_data else ())
      if n_chunks == 1:
        return run_chunk(*args)
      split = lambda t: jax.tree.map(
          lambda a: a.reshape(n_chunks, pl.layout.chunk, *a.shape[1:]), t)
      out = jax.lax.map(lambda a: run_chunk(*a), split(args))
      return jax.tree.map(lambda a: a.reshape(k_local, *a.shape[2:]), out)

    return jax.shard_map(
        client_block, mesh=mesh,
        in_specs=(P(), P(CLIENTS_AXIS) if shard_data else P(), P(CLIENTS_AXIS),
                  P(CLIENTS_AXIS), P(CLIENTS_AXIS), P(CLIENTS_AXIS)),
        out_specs=P(CLIENTS_AXIS), check_vma=False)

  blocks = [sharded_block(pl, pl.client_update) for pl in plans]
  if algorithm.client_query is not None:
    if pooled:
      raise ValueError(f"algorithm '{algorithm.name}' has model pools and a client_query; the "
                       "second client phase is supported for single-pool algorithms only.")
    query = algorithm.client_query
    query_block = sharded_block(plans[0], lambda q, cs, d, rng, info: query(q, cs, d, info))
  else:
    query_block = None

  def pool_phase(pl: _PoolPlan, block, bcast, pool_clients, sampler_state, data, k_sample,
                 k_clients, round_):
    lay = pl.layout
    local, sampler_state = pl.sampler.sample(k_sample, round_, sampler_state)
    present = local >= 0  # a variable cohort (sampling.poisson) leaves slots empty (-1)
    local = jnp.maximum(local, 0)
    gids = local if pl.client_ids is None else pl.client_ids[local]
    n = data.num_examples[gids]
    if sort_by_size:  # empty slots last
      order = jnp.argsort(-jnp.where(present, n, -1), stable=True)
      local, gids, n, present = local[order], gids[order], n[order], present[order]
    pad = lay.padded - lay.cohort
    padded = lambda a: jnp.concatenate([a, jnp.broadcast_to(a[-1:], (pad,))])[pl.slot_order]
    local, gids = padded(local), padded(gids)
    valid = (jnp.arange(lay.padded) < lay.cohort)[pl.slot_order] & padded(present)
    num_ex = jnp.where(valid, padded(n), 0)

    cstate = jax.tree.map(lambda a: a[local], pool_clients)
    rngs = jax.vmap(lambda i: jax.random.fold_in(k_clients, i))(gids)
    infos = ClientInfo(gids, jnp.broadcast_to(round_, gids.shape), valid)
    rows = gather_clients(data, gids) if shard_data else data  # [K_pad, N, ...] from shards
    uploads, new_cstate, cmetrics = block(bcast, rows, cstate, rngs, infos, num_ex)
    num_pool = data.num_examples.shape[0] if pl.client_ids is None else pl.client_ids.shape[0]
    scatter = jnp.where(valid, local, num_pool)  # padding slots -> dropped
    pool_clients = jax.tree.map(lambda a, u: a.at[scatter].set(u, mode="drop"), pool_clients,
                                new_cstate)
    ask = None
    if query_block is not None:  # the second client phase, over the same cohort layout
      ask = lambda q: query_block(q, rows, new_cstate, rngs, infos, num_ex)
    sinfo = ServerInfo(round_, gids, num_ex, valid, ask)
    return uploads, num_ex.astype(jnp.float32), sinfo, pool_clients, sampler_state, cmetrics

  def one_round(state: SimState, data: ClientData, seed):
    k_sample, k_clients, k_server = seeding.round_subkeys(seed, state.round)
    bcast = algorithm.broadcast(state.server)
    pool_states = state.clients if pooled else (state.clients,)
    sampler_states = state.sampler if pooled else (state.sampler,)
    # A pool's cohort key depends on its name, not its position (seeding.pool_sample_key).
    if stream_phases is not None:  # one queue per pool (or the single model's)
      outs, server_args, streamed = [], [], []
      for ph, cs, ss, nm in zip(stream_phases, pool_states, sampler_states, names):
        *out, slots_run, args = ph(bcast, cs, ss, data,
                                   seeding.pool_sample_key(k_sample, nm) if pooled else k_sample,
                                   k_clients, state.round)
        outs.append(out)
        server_args.append(args)
        streamed.append(slots_run)
    else:
      outs = [pool_phase(pl, blk, bcast, cs, ss, data,
                         seeding.pool_sample_key(k_sample, nm) if pooled else k_sample,
                         k_clients, state.round)
              for pl, blk, cs, ss, nm in zip(plans, blocks, pool_states, sampler_states, names)]
    uploads, weights, infos, new_clients, new_samplers, cmetrics = map(tuple, zip(*outs))
    if stream_phases is not None:  # the stream may hand a mean-reading server its running mean
      uploads, server_weights = (tuple(a[i] for a in server_args) for i in (0, 1))
    else:
      server_weights = weights
    if pooled:
      server, smetrics = algorithm.server_update(state.server, uploads, server_weights, infos,
                                                 k_server)
      clients, sampler_state = new_clients, new_samplers
    else:
      server, smetrics = algorithm.server_update(state.server, uploads[0], server_weights[0],
                                                 infos[0], k_server)
      clients, sampler_state = new_clients[0], new_samplers[0]

    metrics, useful, processed = {}, 0.0, 0.0
    for key in set().union(*[m.keys() for m in cmetrics]) - {"useful_examples", "batch_slots",
                                                             "steps"}:
      have = [(m[key], w) for m, w in zip(cmetrics, weights) if key in m]
      metrics[key] = _weighted_mean(jnp.concatenate([v for v, _ in have]),
                                    jnp.concatenate([w for _, w in have]))
    if pooled:
      for name, m, w in zip(names, cmetrics, weights):
        metrics.update({f"{name}/{k}": _weighted_mean(v, w) for k, v in m.items()
                        if k not in ("useful_examples", "batch_slots", "steps")})
    have_pad = all("useful_examples" in m and "batch_slots" in m for m in cmetrics)
    if have_pad:
      for p, (pl, m) in enumerate(zip(plans, cmetrics)):
        if stream_phases is not None:
          processed += streamed[p]
        else:
          batch_slots = m["batch_slots"].reshape(-1, pl.layout.chunk)
          processed += jnp.sum(jnp.max(batch_slots, axis=1)) * pl.layout.chunk
        useful += jnp.sum(m["useful_examples"])
      metrics["padding_efficiency"] = useful / jnp.maximum(processed, 1.0)
      metrics["useful_examples"] = useful
    metrics.update({f"server/{k}": v for k, v in smetrics.items()})
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return SimState(state.round + 1, server, clients, sampler_state), metrics

  def rounds(state: SimState, data: ClientData, seed):
    if rounds_per_call == 1:
      state, metrics = one_round(state, data, seed)
      return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(lambda s, _: one_round(s, data, seed), state, None,
                        length=rounds_per_call)

  if seed is None:
    round_fn, num_args = rounds, 3
  else:
    round_fn, num_args = (lambda state, data: rounds(state, data, seed)), 2
  if not jit:
    return round_fn
  # Fixed shardings: the state and data are replicated, so the output state
  # matches the next call's input and round 2 reuses round 1's executable.
  replicated = NamedSharding(mesh, P())
  shardings = [replicated] * num_args
  if shard_data:
    shardings[1] = NamedSharding(mesh, P(CLIENTS_AXIS))
  return jax.jit(round_fn, donate_argnums=(0,) if donate else (),
                 in_shardings=tuple(shardings), out_shardings=replicated)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree replicated on every device of the mesh.

  Goes through host memory, so it also works when the mesh spans several
  processes (multi-host): every process holds the same values.
  """
  return jax.device_put(jax.device_get(tree), NamedSharding(mesh, P()))
