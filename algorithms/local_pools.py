"""Local training over model pools of split models (the "Local" baseline of FedRE, arXiv 2511.22265).

* Local: every client trains its own split model; nothing is communicated.
Evaluation uses each client's own head.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.head_training import register_split_model, split_kw, train_ce

def local_pools(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_ids=None,
                dim: int = 32, rm: str = "avg", **kw) -> FederatedAlgorithm:
  """Local training of every client's split model; no communication. kw as :func:`fedjax_sim.algorithms.fedproto.fedproto`."""
  kw = dict(kw, dim=dim, rm=rm)
  tkw = split_kw(kw)

  def client_update(model, bcast, params, data, rng, info):
    res = train_ce(model, params, data, rng, info, tkw)
    return (), res.params, res.metrics

  pools, _ = rm_lib.split_pools(archs, spec, clients_per_round, client_update, dim=kw["dim"],
                                rm=kw["rm"], global_head=False, client_ids=client_ids)
  zero = jnp.float32(0.0)
  return FederatedAlgorithm(
      name="local_pools", init=lambda rng: (), init_client=None, client_update=None,
      server_update=lambda s, u, w, i, r: (s, {"comm/upload_scalars": zero,
                                               "comm/broadcast_scalars": zero}),
      eval_params=None, apply_fn=None, personalized=True, pools=pools)


register_split_model("local_pools", local_pools)
