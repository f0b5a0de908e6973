"""Model-heterogeneous baselines of FedRE (arXiv 2511.22265): FedProto, FedGH,
FedAllRep, LG-FedAvg and local training, all as model pools of split models
(extractor g_k + RM to the common dim D + linear head; :mod:`~fedjax_sim.algorithms.rm`).

* FedProto: Tan et al., "FedProto: Federated Prototype Learning across
  Heterogeneous Clients", arXiv 2105.00243 (AAAI 2022), Eq. 5-8. Clients keep
  their whole local model (own head); they upload class prototypes p_kc (mean
  RM representation of class c, Eq. 5) with class counts n_kc; the server
  aggregates p_c = sum_k n_kc p_kc / sum_k n_kc over the round's clients that
  hold class c (Eq. 6 with count weights; the official PFLlib code averages
  unweighted) and broadcasts them; the local loss is
  CE + lambda * mean_b ||RM(g(x_b)) - p_{y_b}||^2 / D on rows whose class has a
  global prototype (Eq. 8; divided by D as in the official code's
  ``nn.MSELoss``). Evaluation uses each client's own model.
* FedGH: Yi et al., "FedGH: Heterogeneous Federated Learning with Generalized
  Global Header", arXiv 2303.13137 (ACM MM 2023), Alg. 1: clients replace
  their head by the global header, train CE, upload class prototypes; the
  server trains the global header on the (prototype, class) pairs with CE.
  The server trainer is the one FedRE uses (1 epoch SGD lr 0.01 batch 32, loss
  summed), so the two differ only in what is uploaded.
* FedAllRep: the FedRE paper's toy upper reference: every client uploads ALL
  its (RM representation, label) pairs; the server trains the head on them
  (same trainer).
* LG-FedAvg: Liang et al., "Think Locally, Act Globally", arXiv 2001.01523:
  local extractors, the head averaged by FedAvg (example weights) each round.
* Local: every client trains its own split model; nothing is communicated.

FedGH, FedAllRep and LG-FedAvg evaluate client k with its extractor and the
global head (as FedRE); FedProto and local with the client's own head.
Every algorithm reports server metrics ``comm/upload_scalars`` and
``comm/broadcast_scalars``: scalars actually sent this round by the real
(non-padding) cohort, prototypes counted for PRESENT classes only (D + 1 per
class: the vector and its class id / count), as the FedRE paper counts.

Axis legend: K cohort, N examples, D common dim, L classes.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fedjax_sim.algorithm import (FederatedAlgorithm, client_optimizer, local_train,
                                  masked_cross_entropy)
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.fedre import ServerState as HeadState, hetero_kwargs


class ProtoUpload(NamedTuple):
  protos: jax.Array  # float32 [L, D]: class prototypes (zeros for absent classes)
  counts: jax.Array  # float32 [L]: examples per class


class ProtoState(NamedTuple):
  protos: jax.Array  # float32 [L, D]: global prototypes
  has: jax.Array  # bool [L]: class has a global prototype


class AllRepUpload(NamedTuple):
  reps: jax.Array  # float32 [N, D]
  labels: jax.Array  # int32 [N]
  mask: jax.Array  # bool [N]


def _train_ce(model, params, data, rng, info, kw, extra_loss=None):
  def loss(p, x, y, m, r):
    ce = masked_cross_entropy(model.apply(p, x), y, m)
    return ce if extra_loss is None else ce + extra_loss(p, x, y, m)
  opt = client_optimizer(kw["client_lr"], kw["client_momentum"], kw["lr_decay"], info.round)
  return local_train(loss, params, opt, data, rng, epochs=kw["epochs"],
                     batch_size=kw["batch_size"], local_steps=kw["local_steps"])


def _valid(infos) -> jax.Array:
  return jnp.concatenate([i.valid for i in infos])


def aggregate_prototypes(protos: jax.Array, counts: jax.Array,
                         valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FedProto's server step: count-weighted mean of client prototypes per class.

  Args: protos float32 [K, L, D]; counts float32 [K, L]; valid bool [K].

  Returns:
    (global protos float32 [L, D] (zeros where no client has the class), has bool [L]).
  """
  c = counts * valid[:, None].astype(counts.dtype)
  total = c.sum(0)
  glob = jnp.einsum("kl,kld->ld", c, protos) / jnp.maximum(total, 1e-12)[:, None]
  return glob, total > 0


def _split_kw(kw):
  return {k: kw[k] for k in ("client_lr", "batch_size", "epochs", "local_steps",
                             "client_momentum", "lr_decay")}


def fedproto(archs: Sequence[str], spec: Any, clients_per_round: int, *, lam: float = 1.0,
             client_ids=None, **kw) -> FederatedAlgorithm:
  """FedProto (see module docstring); ``lam`` = lambda. kw: client_lr, batch_size, epochs,
  local_steps, client_momentum, lr_decay, dim, rm."""
  dim, num_classes, tkw = kw["dim"], spec.num_classes, _split_kw(kw)

  def client_update(model, bcast, params, data, rng, info):
    def reg(p, x, y, m):
      z = model.features(p, x)
      use = (m & bcast.has[y]).astype(jnp.float32)
      d2 = jnp.mean((z - bcast.protos[y]) ** 2, axis=-1)
      return lam * jnp.sum(d2 * use) / jnp.maximum(jnp.sum(m), 1)
    res = _train_ce(model, params, data, rng, info, tkw, reg)
    z = rm_lib.all_features(model, res.params, data.x, tkw["batch_size"])
    protos, counts = rm_lib.class_prototypes(z, data.y, data.mask, num_classes)
    return ProtoUpload(protos, counts), res.params, res.metrics

  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round, client_update, dim=dim,
                                rm=kw["rm"], global_head=False, client_ids=client_ids)

  def server_update(state, uploads, weights, infos, rng):
    up, valid = rm_lib.concat_pools(uploads), _valid(infos)
    protos, has = aggregate_prototypes(up.protos, up.counts, valid)
    present = jnp.sum((up.counts > 0) & valid[:, None]).astype(jnp.float32)
    k = jnp.sum(valid).astype(jnp.float32)
    return ProtoState(protos, has), {
        "classes_with_proto": jnp.sum(has).astype(jnp.float32),
        "comm/upload_scalars": present * (dim + 1),
        "comm/broadcast_scalars": k * jnp.sum(has).astype(jnp.float32) * (dim + 1)}

  init = lambda rng: ProtoState(jnp.zeros((num_classes, dim)), jnp.zeros((num_classes,), bool))
  return FederatedAlgorithm(
      name="fedproto", init=init, init_client=None, client_update=None,
      server_update=server_update, eval_params=None, apply_fn=None, personalized=True,
      pools=pools)


def _head_server(dim, num_classes, num_clients, server_kw, reps_targets_valid):
  """A server update that trains the global head on uploaded pairs (FedGH, FedAllRep).

  ``reps_targets_valid(up, valid, ids, num_classes)`` with ``ids`` int32 [K_tot] the
  uploads' (pool, client) ids returns (reps, targets, valid, row ids, scalars sent) of the
  pairs; row ids name a pair by (pool, client, row), so the head's SGD order does not
  depend on the cohort layout.
  """
  def server_update(state, uploads, weights, infos, rng):
    up, valid = rm_lib.concat_pools(uploads), _valid(infos)
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


def _replace_head_client(tkw, make_upload):
  def client_update(model, head, params, data, rng, info):
    res = _train_ce(model, {**params, "head": head}, data, rng, info, tkw)
    return make_upload(model, res.params, data), res.params, res.metrics
  return client_update


def _head_algorithm(name, archs, spec, clients_per_round, make_upload, reps_targets_valid, kw,
                    server_kw, client_ids):
  dim, num_classes, tkw = kw["dim"], spec.num_classes, _split_kw(kw)
  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round,
                                _replace_head_client(tkw, make_upload), dim=dim, rm=kw["rm"],
                                global_head=True, client_ids=client_ids)
  return FederatedAlgorithm(
      name=name, init=lambda rng: HeadState(rm_lib.init_head(rng, dim, num_classes)),
      init_client=None, client_update=None,
      server_update=_head_server(dim, num_classes, spec.num_clients, server_kw,
                                 reps_targets_valid),
      eval_params=None, apply_fn=None, broadcast=lambda s: s.head, personalized=True,
      pools=pools)


def _server_kw(server_lr=0.01, server_batch_size=32, server_epochs=1, server_reduction="sum"):
  return dict(lr=server_lr, batch_size=server_batch_size, epochs=server_epochs,
              reduction=server_reduction)


def fedgh(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_ids=None,
          server_lr: float = 0.01, server_batch_size: int = 32, server_epochs: int = 1,
          server_reduction: str = "sum", **kw) -> FederatedAlgorithm:
  """FedGH (see module docstring). kw as :func:`fedproto`."""
  dim, bs = kw["dim"], kw["batch_size"]

  def make_upload(model, params, data):
    z = rm_lib.all_features(model, params, data.x, bs)
    return ProtoUpload(*rm_lib.class_prototypes(z, data.y, data.mask, spec.num_classes))

  def pairs(up, valid, ids, num_classes):
    k = up.protos.shape[0]
    rvalid = ((up.counts > 0) & valid[:, None]).reshape(-1)
    targets = jnp.broadcast_to(jnp.eye(num_classes), (k, num_classes, num_classes))
    sent = jnp.sum(rvalid).astype(jnp.float32) * (dim + 1)
    row_ids = (ids[:, None] * num_classes + jnp.arange(num_classes)).reshape(-1)
    return (up.protos.reshape(-1, dim), targets.reshape(-1, num_classes), rvalid, row_ids,
            sent)

  return _head_algorithm("fedgh", archs, spec, clients_per_round, make_upload, pairs, kw,
                         _server_kw(server_lr, server_batch_size, server_epochs,
                                    server_reduction), client_ids)


def fedallrep(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_ids=None,
              server_lr: float = 0.01, server_batch_size: int = 32, server_epochs: int = 1,
              server_reduction: str = "sum", **kw) -> FederatedAlgorithm:
  """FedAllRep (see module docstring). kw as :func:`fedproto`."""
  dim, bs = kw["dim"], kw["batch_size"]

  def make_upload(model, params, data):
    return AllRepUpload(rm_lib.all_features(model, params, data.x, bs), data.y, data.mask)

  def pairs(up, valid, ids, num_classes):
    rvalid = (up.mask & valid[:, None]).reshape(-1)
    targets = jax.nn.one_hot(up.labels.reshape(-1), num_classes)
    sent = jnp.sum(rvalid).astype(jnp.float32) * (dim + 1)
    n = up.mask.shape[1]
    row_ids = (ids[:, None] * n + jnp.arange(n)).reshape(-1)
    return up.reps.reshape(-1, dim), targets, rvalid, row_ids, sent

  return _head_algorithm("fedallrep", archs, spec, clients_per_round, make_upload, pairs, kw,
                         _server_kw(server_lr, server_batch_size, server_epochs,
                                    server_reduction), client_ids)


def lg_fedavg(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_ids=None,
              **kw) -> FederatedAlgorithm:
  """LG-FedAvg (head averaged by FedAvg, example weights). kw as :func:`fedproto`."""
  dim, num_classes, tkw = kw["dim"], spec.num_classes, _split_kw(kw)
  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round,
                                _replace_head_client(tkw, lambda m, p, d: p["head"]), dim=dim,
                                rm=kw["rm"], global_head=True, client_ids=client_ids)

  def server_update(state, uploads, weights, infos, rng):
    heads, valid = rm_lib.concat_pools(uploads), _valid(infos)
    w = jnp.concatenate(weights) * valid
    from fedjax_sim.algorithm import tree_weighted_mean
    head = jax.lax.cond(jnp.sum(w) > 0, lambda: tree_weighted_mean(heads, w), lambda: state.head)
    k = jnp.sum(valid).astype(jnp.float32)
    hs = rm_lib.head_scalars(dim, num_classes)
    return HeadState(head), {"comm/upload_scalars": k * hs, "comm/broadcast_scalars": k * hs}

  return FederatedAlgorithm(
      name="lg_fedavg", init=lambda rng: HeadState(rm_lib.init_head(rng, dim, num_classes)),
      init_client=None, client_update=None, server_update=server_update, eval_params=None,
      apply_fn=None, broadcast=lambda s: s.head, personalized=True, pools=pools)


def local_pools(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_ids=None,
                **kw) -> FederatedAlgorithm:
  """Local training of every client's split model; no communication. kw as :func:`fedproto`."""
  tkw = _split_kw(kw)

  def client_update(model, bcast, params, data, rng, info):
    res = _train_ce(model, params, data, rng, info, tkw)
    return (), res.params, res.metrics

  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round, client_update, dim=kw["dim"],
                                rm=kw["rm"], global_head=False, client_ids=client_ids)
  zero = jnp.float32(0.0)
  return FederatedAlgorithm(
      name="local_pools", init=lambda rng: (), init_client=None, client_update=None,
      server_update=lambda s, u, w, i, r: (s, {"comm/upload_scalars": zero,
                                               "comm/broadcast_scalars": zero}),
      eval_params=None, apply_fn=None, personalized=True, pools=pools)


def _builder(fn, with_server=False, with_lambda=False):
  def build(cfg, spec):
    kw, get = hetero_kwargs(cfg)
    if with_server:
      kw.update(server_lr=get("server_lr", 0.01), server_batch_size=get("server_batch_size", 32),
                server_epochs=get("server_epochs", 1),
                server_reduction=get("server_reduction", "sum"))
    if with_lambda:
      kw["lam"] = get("fedproto_lambda", 1.0)
    return fn(tuple(cfg.archs), spec, cfg.clients_per_round, **kw)
  return build


# Registry builders (cfg, spec) -> FederatedAlgorithm; knobs from cfg.fedre.
BUILDERS = {
    "fedproto": _builder(fedproto, with_lambda=True),
    "fedgh": _builder(fedgh, with_server=True),
    "fedallrep": _builder(fedallrep, with_server=True),
    "lg_fedavg": _builder(lg_fedavg),
    "local_pools": _builder(local_pools),
}
