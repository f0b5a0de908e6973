"""Communication accounting: scalars uploaded and broadcast per round.

Counts come from the pytree SHAPES of what an algorithm's client update returns
(its upload) and what its ``broadcast`` hands to clients, via
``jax.eval_shape`` (nothing is run or compiled). Every array element counts as
one scalar, whatever its dtype (float32 vectors, int32 labels, bool masks),
as the FedRE paper counts "number of scalars" (arXiv 2511.22265, Table on
communication). Shape counts are DENSE upper bounds: an algorithm that sends
prototypes only for the classes a client holds (FedProto, FedGH) uploads fewer
scalars than its [L, D] array; such algorithms report the exact number as the
server metrics ``comm/upload_scalars`` / ``comm/broadcast_scalars``
(``algorithms/fedre.py``, ``algorithms/fedproto.py``, ``fedgh.py``, ...).

Per round: ``upload = sum over cohort clients of upload_per_client`` and
``broadcast = K * broadcast_per_client`` (each selected client receives the
broadcast once; padding slots of the cohort are not counted).

Assumption: one exchange per round (the broadcast down, the client update's
upload up). A second client phase (``client_query`` / ``ServerInfo.query``)
is NOT in these counts: how often it runs is data-dependent. FedMDFG
(``algorithms/fedmdfg.py``) counts here P down (w) and P + 1 up (g_i, l_i)
per client, a lower bound; its server metrics give the exact per-round
numbers, which add d (P down, only when its line search runs) and one eta
down and one loss up per line-search candidate.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.protocol import ClientInfo, FederatedAlgorithm
from fedjax_sim.client_data import AnyClientData, ClientData, gather_clients


def tree_scalars(tree: Any) -> int:
  """Number of array elements in a pytree (of arrays or ShapeDtypeStructs)."""
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def _one_client(data: AnyClientData) -> Any:
  """Shapes of ONE client's padded view (either storage)."""
  return jax.eval_shape(lambda d: gather_clients(d, jnp.int32(0)), data)


def _per_client(client_update, init_client, bcast, data1) -> int:
  key = jax.random.PRNGKey(0)
  info = ClientInfo(jnp.int32(0), jnp.int32(0), jnp.bool_(True))
  cstate = jax.eval_shape(init_client, key)
  upload, _, _ = jax.eval_shape(client_update, bcast, cstate, data1, key, info)
  return tree_scalars(upload)


def round_comm(algorithm: FederatedAlgorithm, data: ClientData,
               clients_per_round: Optional[int] = None) -> dict[str, Any]:
  """Scalars per client and per round for any algorithm, from shapes.

  Args:
    algorithm: single-pool or pooled FederatedAlgorithm.
    data: the training ClientData [C, N, ...] (its shapes only are used).
    clients_per_round: K for single-pool algorithms (``sampler.expected_cohort``: K, or
      q C under Poisson sampling, a float; not the padded bound K_max); ignored for pooled
      ones (each pool's ``clients_per_round``).

  Returns:
    Counts for one broadcast and one upload per client (a second client phase
    through ``client_query`` is not included; see the module docstring):
    ``upload_scalars_per_client``, ``broadcast_scalars_per_client`` (ints;
    for pooled algorithms the K-weighted mean over pools), ``upload_scalars``
    and ``broadcast_scalars`` per round (ints; floats for a fractional expected cohort), and for pooled algorithms
    ``pools``: {pool name: (upload per client, K_p)}.

  Raises:
    ValueError: a single-pool algorithm without clients_per_round.
  """
  server = jax.eval_shape(algorithm.init, jax.random.PRNGKey(0))
  bcast = jax.eval_shape(algorithm.broadcast, server)
  per_bcast = tree_scalars(bcast)
  data1 = _one_client(data)
  if algorithm.pools:
    pools = {p.name: (_per_client(p.client_update, p.init_client, bcast, data1),
                      int(p.clients_per_round)) for p in algorithm.pools}
    k = sum(kp for _, kp in pools.values())
    up = sum(u * kp for u, kp in pools.values())
    return {"upload_scalars_per_client": up / k, "broadcast_scalars_per_client": per_bcast,
            "upload_scalars": up, "broadcast_scalars": k * per_bcast, "pools": pools}
  if clients_per_round is None:
    raise ValueError("round_comm needs clients_per_round (the sampler's K) for a single-pool "
                     "algorithm.")
  per_up = _per_client(algorithm.client_update, algorithm.init_client, bcast, data1)
  return {"upload_scalars_per_client": per_up, "broadcast_scalars_per_client": per_bcast,
          "upload_scalars": clients_per_round * per_up,
          "broadcast_scalars": clients_per_round * per_bcast}


def comm_row(comm: dict[str, Any], rounds_done: int) -> dict[str, float]:
  """Log fields for a metrics row after ``rounds_done`` rounds (per round and cumulative)."""
  return {"comm/upload_scalars_per_round": float(comm["upload_scalars"]),
          "comm/broadcast_scalars_per_round": float(comm["broadcast_scalars"]),
          "comm/upload_scalars_total": float(comm["upload_scalars"]) * rounds_done,
          "comm/broadcast_scalars_total": float(comm["broadcast_scalars"]) * rounds_done}
