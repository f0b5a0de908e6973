"""FedGH as a model pool of split models (a baseline of FedRE, arXiv 2511.22265).

* FedGH: Yi et al., "FedGH: Heterogeneous Federated Learning with Generalized
  Global Header", arXiv 2303.13137 (ACM MM 2023), Alg. 1: clients replace
  their head by the global header, train CE, upload class prototypes; the
  server trains the global header on the (prototype, class) pairs with CE.
  The server trainer is the one FedRE uses (1 epoch SGD lr 0.01 batch 32, loss
  summed), so the two differ only in what is uploaded.

Evaluation: client k with its extractor and the global head (as FedRE).
Axis legend: K cohort, D common dim, L classes.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.fedproto import ProtoUpload
from fedjax_sim.algorithms.head_training import head_algorithm, register_split_model, server_kw

def fedgh(archs: Sequence[str], spec: Any, clients_per_round: int, *, client_ids=None,
          server_lr: float = 0.01, server_batch_size: int = 32, server_epochs: int = 1,
          server_reduction: str = "sum", dim: int = 32, rm: str = "avg",
          **kw) -> FederatedAlgorithm:
  """FedGH (see module docstring). kw as :func:`fedjax_sim.algorithms.fedproto.fedproto`."""
  kw = dict(kw, dim=dim, rm=rm)
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

  return head_algorithm("fedgh", archs, spec, clients_per_round, make_upload, pairs, kw,
                         server_kw(server_lr, server_batch_size, server_epochs,
                                    server_reduction), client_ids)


register_split_model("fedgh", fedgh)
