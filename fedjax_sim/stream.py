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

Supported: single-model algorithms that define ``FederatedAlgorithm.local``
(a :class:`~fedjax_sim.protocol.LocalSpec`), without ``client_query``, on one
device (a mesh of more devices raises; sharding the queue over devices is
future work).

Axis legend: C clients, K cohort, W slots, N examples per client, B batch.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_sim.client_data import batch_rows, gather_clients
from fedjax_sim.protocol import (ClientInfo, FederatedAlgorithm, LocalCarry, LocalPlan,
                                 ServerInfo, local_batch, local_metrics, local_plan, local_step)
from fedjax_sim.sampling import Sampler

DEFAULT_SLOTS = 10  # the fastest W of bench/STREAM.md (digits, K=20 and 100); provisional


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
  out: Any  # (uploads, client states, metrics), each [K, ...]


def supported(algorithm: FederatedAlgorithm) -> Optional[str]:
  """None if ``algorithm`` can stream, else the reason (one line)."""
  if algorithm.pools:
    return f"algorithm '{algorithm.name}' has model pools"
  if algorithm.local is None:
    return f"algorithm '{algorithm.name}' defines no step-form client update (local=LocalSpec)"
  if algorithm.client_query is not None:
    return f"algorithm '{algorithm.name}' has a client_query (a second client phase)"
  return None


def make_stream_phase(algorithm: FederatedAlgorithm, sampler: Sampler, *,
                      slots: Optional[int], num_devices: int,
                      sort_by_size: bool = True) -> Callable[..., tuple]:
  """The client phase of a streamed round (used by :func:`fedjax_sim.round.make_round`).

  Args:
    algorithm: a single-model algorithm with ``local`` (a LocalSpec) and no
      ``client_query``.
    sampler: cohort sampler (K = ``sampler.clients_per_round``).
    slots: W, clients trained side by side (vmapped); capped at K. None:
      ``min(K, DEFAULT_SLOTS)``.
    num_devices: devices of the round's mesh (must be 1).
    sort_by_size: queue the cohort longest first (else in the sampler's order).

  Returns:
    ``phase(bcast, clients [C, ...], sampler_state, data, k_sample, k_clients,
    round) -> (uploads [K, ...], weights float32 [K], ServerInfo, clients [C, ...],
    sampler_state, metrics {name: float32 [K]}, processed float32 [])`` where
    ``processed`` = slot-steps x B (example slots run, for ``padding_efficiency``).

  Raises:
    ValueError: the algorithm cannot stream (model pools, no ``local``, a
      ``client_query``), ``slots`` < 1, or a mesh of more than one device.
  """
  why = supported(algorithm)
  if why is not None:
    raise ValueError(f"schedule='stream' needs a single-model algorithm with a step-form client "
                     f"update (FederatedAlgorithm.local) and no client_query, e.g. fedavg, "
                     f"fedadam, fedyogi, fedadagrad, fedprox, local; {why}: use "
                     f"schedule='chunked'.")
  if num_devices != 1:
    raise ValueError(f"schedule='stream' runs on one device, but the mesh has {num_devices}: "
                     "pass mesh=make_mesh(1) or use schedule='chunked'.")
  k = sampler.clients_per_round
  if slots is not None and slots < 1:
    raise ValueError(f"slots={slots} must be >= 1 for schedule='stream'.")
  w = min(k, slots or DEFAULT_SLOTS)
  spec = algorithm.local
  bsz = spec.batch_size

  def phase(bcast, clients, sampler_state, data, k_sample, k_clients, round_):
    ids, sampler_state = sampler.sample(k_sample, round_, sampler_state)
    n = data.num_examples[ids]
    if sort_by_size:
      order = jnp.argsort(-n, stable=True)
      ids, n = ids[order], n[order]
    cstate_q = jax.tree.map(lambda a: a[ids], clients)  # [K, ...], queue order
    rng_q = jax.vmap(lambda i: jax.random.fold_in(k_clients, i))(ids)
    info_q = ClientInfo(ids, jnp.broadcast_to(round_, ids.shape), jnp.ones(ids.shape, bool))
    at = lambda tree, q: jax.tree.map(lambda a: a[q], tree)
    client_data = lambda gid: gather_clients(data, gid)

    def load(q):
      """ONE slot loads queue position q (clipped to [0, K)): begin, plan, fresh optimizer."""
      info, rng, cdata = at(info_q, q), rng_q[q], client_data(ids[q])
      params0, aux = spec.begin(bcast, at(cstate_q, q), cdata, rng, info)
      plan = local_plan(cdata, rng, epochs=spec.epochs, batch_size=bsz,
                        local_steps=spec.local_steps)
      carry = LocalCarry(params0, spec.optimizer(info).init(params0), jnp.float32(0.0),
                         jnp.int32(0))
      return _Slot(q, jnp.int32(0), info, plan, aux, carry)

    def finish(slot):
      """ONE slot's client is done: (upload, new client state, metrics)."""
      q = jnp.minimum(slot.q, k - 1)
      metrics = local_metrics(slot.carry, slot.plan.steps, bsz)
      return spec.finish(bcast, at(cstate_q, q), slot.aux, slot.carry.params, metrics,
                         client_data(ids[q]), slot.info)

    def step(slot):
      """ONE local step of ONE slot's client (local_train's step s)."""
      idx, bmask = local_batch(slot.plan, slot.s, bsz)
      gid = slot.info.client_id
      loss = lambda p, x, y, m, r: spec.loss(p, slot.aux, x, y, m, r)
      x, y = batch_rows(data, gid, idx, bmask)
      return local_step(loss, spec.optimizer(slot.info), slot.carry, x, y, bmask, jax.random.fold_in(slot.plan.loss_key, slot.s))

    select = lambda mask, new, old: jax.tree.map(
        lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b), new, old)
    finishing = lambda sl: (sl.q < k) & (sl.s >= sl.plan.steps)

    def refill(c: _Loop) -> _Loop:
      sl = c.slots
      done = finishing(sl)
      free = (sl.q >= k) | done
      outs = jax.vmap(finish)(sl)
      # One dynamic_update_slice per slot (row-sized, in place); a slot that finishes nothing
      # rewrites its row's current value.
      dest = jnp.minimum(sl.q, k - 1)
      out = c.out
      for i in range(w):
        def put(buf, u, i=i):
          row = jnp.where(done[i], u[i], jax.lax.dynamic_index_in_dim(buf, dest[i], 0, False))
          return jax.lax.dynamic_update_index_in_dim(buf, row, dest[i], 0)
        out = jax.tree.map(put, out, outs)
      newq = c.next_q + jnp.cumsum(free.astype(jnp.int32)) - 1
      take = free & (newq < k)
      loaded = jax.vmap(load)(jnp.minimum(newq, k - 1))
      sl = select(take, loaded, sl)
      sl = sl._replace(q=jnp.where(take, newq, jnp.where(free, k, sl.q)))
      return _Loop(sl, c.next_q + jnp.sum(take.astype(jnp.int32)), c.iters, out)

    def body(c: _Loop) -> _Loop:
      sl = c.slots
      active = (sl.q < k) & (sl.s < sl.plan.steps)
      carry = select(active, jax.vmap(step)(sl), sl.carry)
      sl = sl._replace(carry=carry, s=sl.s + active.astype(jnp.int32))
      c = c._replace(slots=sl, iters=c.iters + 1)
      return jax.lax.cond(jnp.any(finishing(sl)), refill, lambda c: c, c)

    idle = jax.vmap(load)(jnp.zeros((w,), jnp.int32))
    idle = idle._replace(q=jnp.full((w,), k, jnp.int32))
    one_out = jax.eval_shape(finish, at(idle, 0))
    out = jax.tree.map(lambda s: jnp.zeros((k,) + s.shape, s.dtype), one_out)
    c = refill(_Loop(idle, jnp.int32(0), jnp.int32(0), out))
    c = jax.lax.while_loop(lambda c: jnp.any(c.slots.q < k), body, c)

    uploads, new_cstate, cmetrics = c.out
    clients = jax.tree.map(lambda a, u: a.at[ids].set(u), clients, new_cstate)
    sinfo = ServerInfo(round_, ids, n, jnp.ones(ids.shape, bool), None)
    processed = (c.iters * w * bsz).astype(jnp.float32)
    return uploads, n.astype(jnp.float32), sinfo, clients, sampler_state, cmetrics, processed

  return phase
