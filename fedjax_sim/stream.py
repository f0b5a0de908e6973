"""The streaming schedule: clients stream through W vmapped slots (continuous batching).

``make_round(..., schedule="stream", slots=W)`` runs a round's client work as
ONE ``lax.while_loop`` over W slots instead of size-sorted chunks:

* every iteration runs one local step (:func:`fedjax_sim.protocol.local_step`,
  the arithmetic of :func:`~fedjax_sim.protocol.local_train`'s loop) in every
  active slot, ``vmap``-ed over the W slots;
* a slot whose client has taken all its steps finalizes it: the algorithm's
  ``finish`` gives its upload, new client state and metrics, written at the
  client's cohort position in [K, ...] buffers;
* the slot then loads the next client of the round's queue (the cohort sorted
  by size, longest first) with fresh params and optimizer state from
  ``begin``;

until the queue is empty and every slot idle. Every iteration does W slots of
real work until the last wave, so the padding of size-sorted chunks (a chunk
costs its largest client's steps) mostly vanishes.

Per-client randomness is the chunked schedule's: client key ``fold_in(k_clients,
client_id)``, batch order and loss keys from :func:`~fedjax_sim.protocol.local_plan`,
so the streamed round equals the per-client reference loop
(:mod:`fedjax_sim.reference`) to float32 rounding (tested in
``tests/test_stream.py``). The server update then runs as in the chunked
schedule on the stacked uploads [K, ...] (size-sorted cohort order, no padding
slots) and weights [K].

**Servers that need only the mean.** When ``server_update`` is marked with
:func:`fedjax_sim.protocol.reads_weighted_mean` (FedAvg, FedOpt, FedProx), a finishing client is
folded into a running weighted sum (sum_k n_k u_k, sum_k n_k) instead of a [K, ...] upload
buffer, and ``server_update`` receives the mean as one upload ([1, ...], weights [1.0]): the
round's memory then does not grow with K (client metrics, K scalars each, are still kept).
The summation order differs from the stacked mean's, so the server state equals the chunked
schedule's to float32 rounding, not bit for bit.

**Several devices.** The size-sorted queue is dealt round-robin over the mesh's ``clients``
axis (queue position q goes to device q mod D, so every device gets a similar share of long
and short clients), padded to a multiple of D with empty entries (0 steps, weight 0). Each
device streams its share through its own W slots inside ``shard_map``; running sums are
``psum``-ed, per-client outputs gathered back into queue order.

Supported: single-model algorithms that define ``FederatedAlgorithm.local``
(a :class:`~fedjax_sim.protocol.LocalSpec`), without ``client_query``, on any
number of devices. A spec's ``prepare`` (q-FFL's loss of the global model) runs once per
queued client, W at a time, before the slots start.

Axis legend: C clients, K cohort, W slots, N examples per client, B batch.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from fedjax_sim.client_data import batch_rows, gather_clients
from fedjax_sim.protocol import (ClientInfo, FederatedAlgorithm, LocalCarry, LocalPlan,
                                 ServerInfo, is_mean_reader, local_batch, local_metrics,
                                 local_plan, local_step)
from fedjax_sim import sampling
from fedjax_sim.sampling import Sampler

CLIENTS_AXIS = "clients"

MAX_DEFAULT_SLOTS = 20


def default_slots(queue_length: int) -> int:
  """W when none is given: ceil(K_d / 4), capped at 20 (K_d = a device's queue length).

  From bench/RESULTS.md (2026-12-01, one run on the loaded 2-core CPU): the fastest W was 3-5
  at K = 20, 20 at K = 100 (digits) and 5-20 (equal) at K = 1000 (synthetic). A W close to
  K_d makes the stream plain vmap over one wave (padding returns); a W far above the cache's
  reach makes each W-wide step slow.
  """
  return max(1, min(MAX_DEFAULT_SLOTS, -(-queue_length // 4)))


class _Slot(NamedTuple):
  """One slot's client (stacked [W, ...] in the loop)."""
  q: jax.Array  # int32 []: queue position of the slot's client; K = idle
  s: jax.Array  # int32 []: steps taken
  info: ClientInfo
  plan: LocalPlan
  aux: Any  # the LocalSpec's per-client pytree (begin's second output)
  carry: LocalCarry


class _Loop(NamedTuple):
  slots: _Slot  # [W, ...]
  next_q: jax.Array  # int32 []: next queue position to load
  iters: jax.Array  # int32 []: loop iterations (each one W slot-steps)
  out: Any  # (uploads or None, client states, metrics), each [K_d, ...]
  acc: Any  # (sum_k n_k upload_k, sum_k n_k) when the server reads only the mean, else ()


def supported(algorithm: FederatedAlgorithm) -> Optional[str]:
  """None if ``algorithm`` can stream, else the reason (one line)."""
  if algorithm.pools:
    missing = [p.name for p in algorithm.pools if p.local is None]
    if missing:
      return (f"algorithm '{algorithm.name}' has model pools without a step-form client update "
              f"(Pool.local): {missing}")
  elif algorithm.local is None:
    return f"algorithm '{algorithm.name}' defines no step-form client update (local=LocalSpec)"
  if algorithm.client_query is not None:
    return f"algorithm '{algorithm.name}' has a client_query (a second client phase)"
  return None


def make_stream_phases(algorithm: FederatedAlgorithm, sampler: Optional[Sampler], *,
                       slots: Optional[int], mesh: Mesh,
                       sort_by_size: bool = True) -> list[Callable[..., tuple]]:
  """One streamed client phase per queue: the single model's, or one per model pool.

  Pools have different parameter shapes, so each pool streams its own cohort through its own
  slots, one queue after the other in the same program; each pool samples
  ``Pool.clients_per_round`` of its members uniformly (as the chunked schedule does).

  Args:
    algorithm: an algorithm :func:`supported` accepts.
    sampler: the cohort sampler of a single-model algorithm (ignored for pools).
    slots, mesh, sort_by_size: as :func:`make_stream_phase`.

  Returns:
    one ``phase`` (see :func:`make_stream_phase`) per pool, or a single one. A pool's phase
    takes the pool's sampler key and client states and samples LOCAL member indices.

  Raises:
    ValueError: as :func:`make_stream_phase`.
  """
  why = supported(algorithm)
  if why is not None:
    raise ValueError(f"schedule='stream' needs a step-form client update "
                     f"(FederatedAlgorithm.local, or Pool.local for every pool) and no "
                     f"client_query, e.g. fedavg, fedadam, fedyogi, fedadagrad, fedprox, local, "
                     f"fedavg_pools; {why}: use schedule='chunked'.")
  if not algorithm.pools:
    return [make_stream_phase(algorithm.local, sampler, slots=slots, mesh=mesh,
                              sort_by_size=sort_by_size,
                              mean_only=is_mean_reader(algorithm.server_update))]
  return [make_stream_phase(p.local, sampling.uniform(len(p.client_ids), p.clients_per_round),
                            slots=slots, mesh=mesh, sort_by_size=sort_by_size,
                            client_ids=np.asarray(p.client_ids, np.int32))
          for p in algorithm.pools]


def make_stream_phase(spec, sampler: Sampler, *, slots: Optional[int], mesh: Mesh,
                      sort_by_size: bool = True, mean_only: bool = False,
                      client_ids: Optional[np.ndarray] = None) -> Callable[..., tuple]:
  """The client phase of ONE streamed queue (used by :func:`fedjax_sim.round.make_round`).

  Args:
    spec: the step-form client update (:class:`~fedjax_sim.protocol.LocalSpec`).
    sampler: cohort sampler (K = ``sampler.clients_per_round``); for a pool it samples local
      member indices in [0, C_p).
    slots: W, clients trained side by side (vmapped) on each device; capped at the device's
      queue length ceil(K / D). None: :func:`default_slots`.
    mesh: the round's 1-D mesh (axis ``clients``, D devices).
    sort_by_size: queue the cohort longest first (else in the sampler's order).
    mean_only: the server reads only the uploads' weighted mean
      (:func:`~fedjax_sim.protocol.reads_weighted_mean`): keep a running sum.
    client_ids: int32 [C_p] global ids of a pool's members (None: the sampler's ids are
      global ids).

  Returns:
    ``phase(bcast, clients [C, ...], sampler_state, data, k_sample, k_clients,
    round) -> (uploads, weights float32 [K], ServerInfo, clients [C, ...],
    sampler_state, metrics {name: float32 [K]}, processed float32 [], server_args)`` where
    ``uploads`` are [K, ...] in queue (size-sorted) order, ``processed`` = slot-steps x B
    (example slots run, for ``padding_efficiency``) and ``server_args`` = (uploads, weights)
    to pass to ``server_update``: the stacked ones, or the running mean ([1, ...], [1.0])
    for a server marked :func:`~fedjax_sim.protocol.reads_weighted_mean` (``uploads`` is
    then None).

  Raises:
    ValueError: ``slots`` < 1.
  """
  if slots is not None and slots < 1:
    raise ValueError(f"slots={slots} must be >= 1 for schedule='stream'.")
  k = sampler.clients_per_round
  devices = mesh.devices.size
  kd = -(-k // devices)  # queue length per device
  kp = kd * devices
  w = min(kd, slots or default_slots(kd))
  bsz = spec.batch_size
  members = None if client_ids is None else jnp.asarray(client_ids)
  # Device-major order: device d holds queue positions d, d + D, d + 2D, ...
  to_dev = np.arange(kp).reshape(kd, devices).T.reshape(-1)
  from_dev = np.argsort(to_dev)

  def device_queue(bcast, data, ids, n, valid, cstate_q, rng_q, round_):
    """Streams ONE device's queue of K_d clients through its W slots."""
    info_q = ClientInfo(ids, jnp.broadcast_to(round_, ids.shape), valid)
    at = lambda tree, q: jax.tree.map(lambda a: a[q], tree)

    def client_data(q):
      cdata = gather_clients(data, ids[q])
      return cdata._replace(num_examples=n[q], mask=cdata.mask & valid[q])

    prepared = None
    if spec.prepare is not None:  # once per queued client, W at a time, before the slots run
      prepared = jax.lax.map(
          lambda q: spec.prepare(bcast, at(cstate_q, q), client_data(q), at(info_q, q)),
          jnp.arange(kd), batch_size=min(w, kd))

    def load(q):
      """ONE slot loads queue position q (clipped to [0, K_d)): begin, plan, fresh optimizer."""
      info, rng, cdata = at(info_q, q), rng_q[q], client_data(q)
      extra = () if prepared is None else (at(prepared, q),)
      params0, aux = spec.begin(bcast, at(cstate_q, q), cdata, rng, info, *extra)
      plan = local_plan(cdata, rng, epochs=spec.epochs, batch_size=bsz,
                        local_steps=spec.local_steps)
      plan = plan._replace(steps=jnp.where(valid[q], plan.steps, 0))
      carry = LocalCarry(params0, spec.optimizer(info).init(params0), jnp.float32(0.0),
                         jnp.int32(0))
      return _Slot(q, jnp.int32(0), info, plan, aux, carry)

    def finish(slot):
      """ONE slot's client is done: (upload, new client state, metrics)."""
      q = jnp.minimum(slot.q, kd - 1)
      metrics = local_metrics(slot.carry, slot.plan.steps, bsz)
      return spec.finish(bcast, at(cstate_q, q), slot.aux, slot.carry.params, metrics,
                         client_data(q), slot.info)

    def step(slot):
      """ONE local step of ONE slot's client (local_train's step s)."""
      idx, bmask = local_batch(slot.plan, slot.s, bsz)
      x, y = batch_rows(data, slot.info.client_id, idx, bmask)
      loss = lambda p, x, y, m, r: spec.loss(p, slot.aux, x, y, m, r)
      return local_step(loss, spec.optimizer(slot.info), slot.carry, x, y, bmask,
                        jax.random.fold_in(slot.plan.loss_key, slot.s))

    select = lambda mask, new, old: jax.tree.map(
        lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b), new, old)
    finishing = lambda sl: (sl.q < kd) & (sl.s >= sl.plan.steps)

    def refill(c: _Loop) -> _Loop:
      sl = c.slots
      done = finishing(sl)
      free = (sl.q >= kd) | done
      upload, cstate, metrics = jax.vmap(finish)(sl)
      acc = c.acc
      if mean_only:  # fold the finished clients into the running weighted sum
        wts = jnp.where(done, n[jnp.minimum(sl.q, kd - 1)], 0).astype(jnp.float32)
        total, wsum = acc
        total = jax.tree.map(lambda t, u: t + jnp.tensordot(wts.astype(u.dtype), u, axes=1),
                             total, upload)
        acc = (total, wsum + jnp.sum(wts))
        outs = (None, cstate, metrics)
      else:
        outs = (upload, cstate, metrics)
      # One dynamic_update_slice per slot (row-sized, in place); a slot that finishes nothing
      # rewrites its row's current value.
      dest = jnp.minimum(sl.q, kd - 1)
      out = c.out
      for i in range(w):
        def put(buf, u, i=i):
          row = jnp.where(done[i], u[i], jax.lax.dynamic_index_in_dim(buf, dest[i], 0, False))
          return jax.lax.dynamic_update_index_in_dim(buf, row, dest[i], 0)
        out = jax.tree.map(put, out, outs)
      newq = c.next_q + jnp.cumsum(free.astype(jnp.int32)) - 1
      take = free & (newq < kd)
      loaded = jax.vmap(load)(jnp.minimum(newq, kd - 1))
      sl = select(take, loaded, sl)
      sl = sl._replace(q=jnp.where(take, newq, jnp.where(free, kd, sl.q)))
      return _Loop(sl, c.next_q + jnp.sum(take.astype(jnp.int32)), c.iters, out, acc)

    def body(c: _Loop) -> _Loop:
      sl = c.slots
      active = (sl.q < kd) & (sl.s < sl.plan.steps)
      carry = select(active, jax.vmap(step)(sl), sl.carry)
      sl = sl._replace(carry=carry, s=sl.s + active.astype(jnp.int32))
      c = c._replace(slots=sl, iters=c.iters + 1)
      return jax.lax.cond(jnp.any(finishing(sl)), refill, lambda c: c, c)

    idle = jax.vmap(load)(jnp.zeros((w,), jnp.int32))
    idle = idle._replace(q=jnp.full((w,), kd, jnp.int32))
    upload1, cstate1, metrics1 = jax.eval_shape(finish, at(idle, 0))
    buf = lambda tree: jax.tree.map(lambda s: jnp.zeros((kd,) + s.shape, s.dtype), tree)
    if mean_only:
      out = (None, buf(cstate1), buf(metrics1))
      acc = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), upload1), jnp.float32(0.0))
    else:
      out, acc = (buf(upload1), buf(cstate1), buf(metrics1)), ()
    c = refill(_Loop(idle, jnp.int32(0), jnp.int32(0), out, acc))
    c = jax.lax.while_loop(lambda c: jnp.any(c.slots.q < kd), body, c)
    acc = jax.lax.psum(c.acc, CLIENTS_AXIS) if mean_only else ()
    return c.out, acc, c.iters[None]

  sharded_queue = jax.shard_map(
      device_queue, mesh=mesh,
      in_specs=(P(), P(), P(CLIENTS_AXIS), P(CLIENTS_AXIS), P(CLIENTS_AXIS), P(CLIENTS_AXIS),
                P(CLIENTS_AXIS), P()),
      out_specs=(P(CLIENTS_AXIS), P(), P(CLIENTS_AXIS)), check_vma=False)

  def phase(bcast, clients, sampler_state, data, k_sample, k_clients, round_):
    local, sampler_state = sampler.sample(k_sample, round_, sampler_state)
    ids = local if members is None else members[local]
    n = data.num_examples[ids]
    if sort_by_size:
      order = jnp.argsort(-n, stable=True)
      local, ids, n = local[order], ids[order], n[order]
    pad = lambda a: jnp.concatenate([a, jnp.broadcast_to(a[-1:], (kp - k,) + a.shape[1:])])
    valid = jnp.arange(kp) < k
    ids_d, valid_d = pad(ids)[to_dev], valid[to_dev]
    n_d = jnp.where(valid_d, pad(n)[to_dev], 0)
    cstate_d = jax.tree.map(lambda a: a[pad(local)[to_dev]], clients)
    rng_d = jax.vmap(lambda i: jax.random.fold_in(k_clients, i))(ids_d)
    (uploads, new_cstate, cmetrics), acc, iters = sharded_queue(
        bcast, data, ids_d, n_d, valid_d, cstate_d, rng_d, round_)
    queue = lambda tree: jax.tree.map(lambda a: a[from_dev][:k], tree)
    new_cstate, cmetrics = queue(new_cstate), queue(cmetrics)
    clients = jax.tree.map(lambda a, u: a.at[local].set(u), clients, new_cstate)
    weights = n.astype(jnp.float32)
    if mean_only:
      total, wsum = acc
      mean = jax.tree.map(lambda t: t / jnp.maximum(wsum, 1e-12).astype(t.dtype), total)
      uploads, server_args = None, (jax.tree.map(lambda a: a[None], mean), jnp.ones((1,)))
    else:
      uploads = queue(uploads)
      server_args = (uploads, weights)
    sinfo = ServerInfo(round_, ids, n, jnp.ones(ids.shape, bool), None)
    processed = (jnp.sum(iters) * w * bsz).astype(jnp.float32)
    return (uploads, weights, sinfo, clients, sampler_state, cmetrics, processed,
            server_args)

  return phase
