"""FedProto as a model pool of split models (a baseline of FedRE, arXiv 2511.22265).

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

Axis legend: K cohort, N examples, D common dim, L classes.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.head_training import (register_split_model, split_kw, train_ce,
                                                 valid_slots)

class ProtoUpload(NamedTuple):
  protos: jax.Array  # float32 [L, D]: class prototypes (zeros for absent classes)
  counts: jax.Array  # float32 [L]: examples per class


class ProtoState(NamedTuple):
  protos: jax.Array  # float32 [L, D]: global prototypes
  has: jax.Array  # bool [L]: class has a global prototype


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


def proto_client_update(lam, num_classes: int, tkw: dict):
  """FedProto's client update for ONE client of a pool: CE + lam * mean ||RM(g(x)) - P^_y||^2 / D
  over the classes the broadcast has prototypes for (``bcast.has``, ``bcast.protos`` [L, D]),
  then the class prototypes [L, D] and counts [L] of the trained features (also FedTGP's)."""
  def client_update(model, bcast, params, data, rng, info):
    def reg(p, x, y, m):
      z = model.features(p, x)
      use = (m & bcast.has[y]).astype(jnp.float32)
      d2 = jnp.mean((z - bcast.protos[y]) ** 2, axis=-1)
      return lam * jnp.sum(d2 * use) / jnp.maximum(jnp.sum(m), 1)
    res = train_ce(model, params, data, rng, info, tkw, reg)
    z = rm_lib.all_features(model, res.params, data.x, tkw["batch_size"])
    protos, counts = rm_lib.class_prototypes(z, data.y, data.mask, num_classes)
    return ProtoUpload(protos, counts), res.params, res.metrics
  return client_update


def fedproto(archs: Sequence[str], spec: Any, clients_per_round: int, *, lam: float = 1.0,
             dim: int = 32, rm: str = "avg", client_ids=None, **kw) -> FederatedAlgorithm:
  """FedProto (see module docstring); ``lam`` = lambda; ``dim`` = D, the common
  representation dim, ``rm`` the representation mapping (:mod:`~fedjax_sim.algorithms.rm`).
  kw: client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay."""
  kw = dict(kw, dim=dim, rm=rm)
  num_classes, tkw = spec.num_classes, split_kw(kw)

  client_update = proto_client_update(lam, num_classes, tkw)

  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round, client_update, dim=dim,
                                rm=kw["rm"], global_head=False, client_ids=client_ids)

  def server_update(state, uploads, weights, infos, rng):
    up, valid = rm_lib.concat_pools(uploads), valid_slots(infos)
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


register_split_model("fedproto", fedproto)
