"""LG-FedAvg as a model pool of split models (a baseline of FedRE, arXiv 2511.22265).

* LG-FedAvg: Liang et al., "Think Locally, Act Globally", arXiv 2001.01523:
  local extractors, the head averaged by FedAvg (example weights) each round.

Evaluation: client k with its extractor and the global head (as FedRE).
Axis legend: K cohort, D common dim, L classes.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from fedjax_sim.protocol import FederatedAlgorithm, tree_weighted_mean
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.fedre import ServerState as HeadState
from fedjax_sim.algorithms.head_training import (register_split_model, replace_head_client,
                                                 split_kw, valid_slots)

def lg_fedavg(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_ids=None,
              dim: int = 32, rm: str = "avg", **kw) -> FederatedAlgorithm:
  """LG-FedAvg (head averaged by FedAvg, example weights). kw as :func:`fedjax_sim.algorithms.fedproto.fedproto`."""
  kw = dict(kw, dim=dim, rm=rm)
  dim, num_classes, tkw = kw["dim"], spec.num_classes, split_kw(kw)
  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round,
                                replace_head_client(tkw, lambda m, p, d: p["head"]), dim=dim,
                                rm=kw["rm"], global_head=True, client_ids=client_ids)

  def server_update(state, uploads, weights, infos, rng):
    heads, valid = rm_lib.concat_pools(uploads), valid_slots(infos)
    w = jnp.concatenate(weights) * valid
    head = jax.lax.cond(jnp.sum(w) > 0, lambda: tree_weighted_mean(heads, w), lambda: state.head)
    k = jnp.sum(valid).astype(jnp.float32)
    hs = rm_lib.head_scalars(dim, num_classes)
    return HeadState(head), {"comm/upload_scalars": k * hs, "comm/broadcast_scalars": k * hs}

  return FederatedAlgorithm(
      name="lg_fedavg", init=lambda rng: HeadState(rm_lib.init_head(rng, dim, num_classes)),
      init_client=None, client_update=None, server_update=server_update, eval_params=None,
      apply_fn=None, broadcast=lambda s: s.head, personalized=True, pools=pools)


register_split_model("lg_fedavg", lg_fedavg)
