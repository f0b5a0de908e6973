"""Shared pieces of FedRE's model-heterogeneous baselines (FedProto, FedGH, FedAllRep,
LG-FedAvg, local): local cross-entropy training of a split model, the server that
trains a global head on uploaded (representation, label) pairs, the client that
replaces its head by the broadcast one, and the registry builder.

All of them are model pools of split models (extractor g_k + RM to the common dim D +
linear head; :mod:`~fedjax_sim.algorithms.rm`). Every algorithm reports server metrics ``comm/upload_scalars`` and
``comm/broadcast_scalars``: scalars actually sent this round by the real
(non-padding) cohort, prototypes counted for PRESENT classes only (D + 1 per
class: the vector and its class id / count), as the FedRE paper counts.

Axis legend: K cohort, N examples, D common dim, L classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sim.protocol import (FederatedAlgorithm, client_optimizer, local_train,
                                 masked_cross_entropy)
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.fedre import ServerState as HeadState
from fedjax_sim.algorithms.registry import register


def train_ce(model, params, data, rng, info, kw, extra_loss=None):
  def loss(p, x, y, m, r):
    ce = masked_cross_entropy(model.apply(p, x), y, m)
    return ce if extra_loss is None else ce + extra_loss(p, x, y, m)
  opt = client_optimizer(kw["client_lr"], kw["client_momentum"], kw["lr_decay"], info.round)
  return local_train(loss, params, opt, data, rng, epochs=kw["epochs"],
                     batch_size=kw["batch_size"], local_steps=kw["local_steps"])


def valid_slots(infos) -> jax.Array:
  """bool [K_tot]: the real (non-padding) slots of every pool, concatenated."""
  return jnp.concatenate([i.valid for i in infos])


def split_kw(kw):
  return {k: kw[k] for k in ("client_lr", "batch_size", "epochs", "local_steps",
                             "client_momentum", "lr_decay")}


def head_server(dim, num_classes, num_clients, server_kw, reps_targets_valid):
  """A server update that trains the global head on uploaded pairs (FedGH, FedAllRep).

  ``reps_targets_valid(up, valid, ids, num_classes)`` with ``ids`` int32 [K_tot] the
  uploads' (pool, client) ids returns (reps, targets, valid, row ids, scalars sent) of the
  pairs; row ids name a pair by (pool, client, row), so the head's SGD order does not
  depend on the cohort layout.
  """
  def server_update(state, uploads, weights, infos, rng):
    up, valid = rm_lib.concat_pools(uploads), valid_slots(infos)
    ids = rm_lib.upload_ids(infos, num_clients)
    reps, targets, rvalid, row_ids, sent = reps_targets_valid(up, valid, ids, num_classes)
    head, loss = rm_lib.train_head(state.head, reps, targets, rvalid, rng, row_ids=row_ids,
                                   **server_kw)
    k = jnp.sum(valid).astype(jnp.float32)
    return HeadState(head), {
        "head_loss": loss, "server_pairs": jnp.sum(rvalid).astype(jnp.float32),
        "comm/upload_scalars": sent,
        "comm/broadcast_scalars": k * rm_lib.head_scalars(dim, num_classes)}
  return server_update


def replace_head_client(tkw, make_upload):
  def client_update(model, head, params, data, rng, info):
    res = train_ce(model, {**params, "head": head}, data, rng, info, tkw)
    return make_upload(model, res.params, data), res.params, res.metrics
  return client_update


def head_algorithm(name, archs, spec, clients_per_round, make_upload, reps_targets_valid, kw,
                    server_kw, client_ids):
  dim, num_classes, tkw = kw["dim"], spec.num_classes, split_kw(kw)
  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round,
                                replace_head_client(tkw, make_upload), dim=dim, rm=kw["rm"],
                                global_head=True, client_ids=client_ids)
  return FederatedAlgorithm(
      name=name, init=lambda rng: HeadState(rm_lib.init_head(rng, dim, num_classes)),
      init_client=None, client_update=None,
      server_update=head_server(dim, num_classes, spec.num_clients, server_kw,
                                 reps_targets_valid),
      eval_params=None, apply_fn=None, broadcast=lambda s: s.head, personalized=True,
      pools=pools)


def server_kw(server_lr=0.01, server_batch_size=32, server_epochs=1, server_reduction="sum"):
  return dict(lr=server_lr, batch_size=server_batch_size, epochs=server_epochs,
              reduction=server_reduction)


def register_split_model(name: str, fn) -> None:
  """Registers split-model method ``fn(archs, spec, K, **client, **knobs)`` as ``name``
  (knobs ``--config.<name>.<knob>``: its signature's dim, rm, ...; pools from
  ``--config.archs``)."""
  @register(name, fn, fixed=("client_ids",), pooled=True)
  def build(ctx, **knobs):
    return fn(ctx.archs, ctx.spec, ctx.clients_per_round, **ctx.client, **knobs)
