"""The round builder: one federated round (or several) as ONE jitted program.

``make_round`` returns ``round_fn(state, data) -> (state, metrics)`` that

1. derives the round key ``fold_in(PRNGKey(seed), round)``;
2. samples the cohort (a :class:`~fedjax_sim.sampling.Sampler`);
3. sorts it by client size and lays it out in chunks of similar clients,
   padded with zero-weight slots to a multiple of devices x chunk size;
4. gathers the cohort's data and per-client state on device (no host copies);
5. runs ``vmap(client_update)`` over each chunk (``lax.map`` over chunks),
   inside ``shard_map`` over the mesh axis ``clients``;
6. runs the server update on the stacked uploads;
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

from fedjax_sim.algorithm import ClientInfo, FederatedAlgorithm, ServerInfo
from fedjax_sim.client_data import ClientData
from fedjax_sim.sampling import Sampler

CLIENTS_AXIS = "clients"


class SimState(NamedTuple):
  """Everything a simulation carries between rounds (a pytree of arrays).

  Attributes:
    round: int32 []: number of rounds completed.
    server: the algorithm's server state.
    clients: per-client state stacked to [C, ...] (``()`` when stateless).
    sampler: the sampler's state.
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


def init_state(algorithm: FederatedAlgorithm, sampler: Sampler, num_clients: int,
               seed: int, mesh: Optional[Mesh] = None) -> SimState:
  """Initial state: server from ``fold_in(key, 0)``, client i from ``fold_in(key1, i)``.

  With ``mesh``, the state is placed replicated on it, exactly as the round
  function returns it, so the first and later rounds share one executable.
  """
  key = jax.random.PRNGKey(seed)
  server = algorithm.init(jax.random.fold_in(key, 0))
  ckey = jax.random.fold_in(key, 1)
  clients = jax.vmap(lambda i: algorithm.init_client(jax.random.fold_in(ckey, i)))(
      jnp.arange(num_clients))
  state = SimState(jnp.int32(0), server, clients, sampler.init())
  return state if mesh is None else replicate(state, mesh)


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


def make_round(algorithm: FederatedAlgorithm, sampler: Sampler, *, seed: int,
               mesh: Optional[Mesh] = None, chunk_size: Optional[int] = None,
               rounds_per_call: int = 1, sort_by_size: bool = True, donate: bool = True,
               jit: bool = True):
  """Builds the jitted round function.

  Args:
    algorithm: the FederatedAlgorithm.
    sampler: cohort sampler (K = sampler.clients_per_round).
    seed: run seed; round r uses ``fold_in(PRNGKey(seed), r)``.
    mesh: a 1-D mesh with axis ``clients`` (default: all local devices).
    chunk_size: clients vmapped together; chunks run one after another via
      ``lax.map`` (bounds memory, and with size sorting cuts padded steps).
      Default: all of a device's clients in one vmap.
    rounds_per_call: rounds fused by ``lax.scan`` in one call.
    sort_by_size: order the cohort by size before chunking.
    donate: donate the input state's buffers.
    jit: False returns the un-jitted function (for tests and tracing).

  Returns:
    ``round_fn(state: SimState, data: ClientData [C, N, ...]) -> (SimState,
    metrics)``; every metric is float32 [rounds_per_call]. Metrics: client
    metrics averaged with example weights (``loss``, ...), ``server/...``
    metrics, ``padding_efficiency`` (useful / processed examples, when the
    client reports ``useful_examples`` and ``batch_slots``).
  """
  mesh = mesh or make_mesh()
  layout = cohort_layout(sampler.clients_per_round, mesh.devices.size, chunk_size)
  slot_order = jnp.asarray(_slot_order(layout))

  def client_block(bcast, cstate, cdata, rngs, infos):
    """Runs on one device: [K_local, ...] -> chunks of vmapped clients."""
    vupdate = jax.vmap(algorithm.client_update, in_axes=(None, 0, 0, 0, 0))
    k_local = infos.valid.shape[0]
    n_chunks = k_local // layout.chunk
    if n_chunks == 1:
      return vupdate(bcast, cstate, cdata, rngs, infos)
    split = lambda t: jax.tree.map(lambda a: a.reshape(n_chunks, layout.chunk, *a.shape[1:]), t)
    out = jax.lax.map(lambda args: vupdate(bcast, *args), split((cstate, cdata, rngs, infos)))
    return jax.tree.map(lambda a: a.reshape(k_local, *a.shape[2:]), out)

  sharded_block = jax.shard_map(
      client_block, mesh=mesh,
      in_specs=(P(), P(CLIENTS_AXIS), P(CLIENTS_AXIS), P(CLIENTS_AXIS), P(CLIENTS_AXIS)),
      out_specs=P(CLIENTS_AXIS), check_vma=False)

  def one_round(state: SimState, data: ClientData):
    rkey = jax.random.fold_in(jax.random.PRNGKey(seed), state.round)
    k_sample, k_clients, k_server = jax.random.split(rkey, 3)
    cohort, sampler_state = sampler.sample(k_sample, state.round, state.sampler)
    n = data.num_examples[cohort]
    if sort_by_size:
      order = jnp.argsort(-n, stable=True)
      cohort, n = cohort[order], n[order]
    pad = layout.padded - layout.cohort
    ids = jnp.concatenate([cohort, jnp.broadcast_to(cohort[-1:], (pad,))])[slot_order]
    valid = (jnp.arange(layout.padded) < layout.cohort)[slot_order]
    num_ex = jnp.where(valid, jnp.concatenate([n, jnp.zeros((pad,), n.dtype)])[slot_order], 0)

    cdata = jax.tree.map(lambda a: a[ids], data)._replace(num_examples=num_ex)
    cdata = cdata._replace(mask=cdata.mask & valid[:, None])
    cstate = jax.tree.map(lambda a: a[ids], state.clients)
    rngs = jax.vmap(lambda i: jax.random.fold_in(k_clients, i))(ids)
    infos = ClientInfo(ids, jnp.broadcast_to(state.round, ids.shape), valid)
    bcast = algorithm.broadcast(state.server)
    uploads, new_cstate, cmetrics = sharded_block(bcast, cstate, cdata, rngs, infos)

    weights = num_ex.astype(jnp.float32)
    server, smetrics = algorithm.server_update(
        state.server, uploads, weights, ServerInfo(state.round, ids, num_ex, valid), k_server)
    scatter_ids = jnp.where(valid, ids, data.num_examples.shape[0])  # padding -> dropped
    clients = jax.tree.map(lambda a, u: a.at[scatter_ids].set(u, mode="drop"),
                           state.clients, new_cstate)

    metrics = {k: _weighted_mean(v, weights) for k, v in cmetrics.items()
               if k not in ("useful_examples", "batch_slots", "steps")}
    if "useful_examples" in cmetrics and "batch_slots" in cmetrics:
      slots = cmetrics["batch_slots"].reshape(-1, layout.chunk)
      processed = jnp.sum(jnp.max(slots, axis=1)) * layout.chunk
      metrics["padding_efficiency"] = jnp.sum(cmetrics["useful_examples"]) / jnp.maximum(
          processed, 1.0)
      metrics["useful_examples"] = jnp.sum(cmetrics["useful_examples"])
    metrics.update({f"server/{k}": v for k, v in smetrics.items()})
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return SimState(state.round + 1, server, clients, sampler_state), metrics

  def round_fn(state: SimState, data: ClientData):
    if rounds_per_call == 1:
      state, metrics = one_round(state, data)
      return state, jax.tree.map(lambda m: m[None], metrics)
    return jax.lax.scan(lambda s, _: one_round(s, data), state, None, length=rounds_per_call)

  if not jit:
    return round_fn
  # Fixed shardings: the state and data are replicated, so the output state
  # matches the next call's input and round 2 reuses round 1's executable.
  replicated = NamedSharding(mesh, P())
  return jax.jit(round_fn, donate_argnums=(0,) if donate else (),
                 in_shardings=(replicated, replicated), out_shardings=replicated)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree replicated on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))
