"""FedAllRep as a model pool of split models (the FedRE paper's upper reference, arXiv 2511.22265).

* FedAllRep: the FedRE paper's toy upper reference: every client uploads ALL
  its (RM representation, label) pairs; the server trains the head on them
  (same trainer).

Evaluation: client k with its extractor and the global head (as FedRE).
Axis legend: K cohort, N examples, D common dim, L classes.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.head_training import head_algorithm, register_split_model, server_kw

class AllRepUpload(NamedTuple):
  reps: jax.Array  # float32 [N, D]
  labels: jax.Array  # int32 [N]
  mask: jax.Array  # bool [N]


def fedallrep(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_ids=None,
              server_lr: float = 0.01, server_batch_size: int = 32, server_epochs: int = 1,
              server_reduction: str = "sum", dim: int = 32, rm: str = "avg",
              **kw) -> FederatedAlgorithm:
  """FedAllRep (see module docstring). kw as :func:`fedjax_sim.algorithms.fedproto.fedproto`."""
  kw = dict(kw, dim=dim, rm=rm)
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

  return head_algorithm("fedallrep", archs, spec, clients_per_round, make_upload, pairs, kw,
                         server_kw(server_lr, server_batch_size, server_epochs,
                                    server_reduction), client_ids)


register_split_model("fedallrep", fedallrep)
