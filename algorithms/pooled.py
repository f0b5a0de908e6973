"""Model pools: client-to-architecture assignment, and FedAvg within each pool.

``assign_round_robin`` gives client i the architecture ``i mod P`` (the
heterogeneous-FL literature's convention, e.g. FedRE's official code).
``fedavg_per_pool`` is the simplest model-heterogeneous baseline: an
independent FedAvg global model per architecture, all pools trained in the
same jitted round (it is also the engine's test vehicle for pools).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
import optax

from fedjax_sim import models
from fedjax_sim.protocol import FederatedAlgorithm, Pool
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.registry import DataSpec, register


def assign_round_robin(num_clients: int, num_pools: int) -> list[np.ndarray]:
  """Client ids per pool: pool p holds clients p, p + P, p + 2P, ...

  Raises:
    ValueError: more pools than clients.
  """
  if not 1 <= num_pools <= num_clients:
    raise ValueError(f"{num_pools} architectures for {num_clients} clients: each pool needs at "
                     "least one client; list fewer architectures or add clients.")
  return [np.arange(p, num_clients, num_pools, dtype=np.int32) for p in range(num_pools)]


def pool_cohort_sizes(pool_sizes: Sequence[int], clients_per_round: int) -> list[int]:
  """Splits K over pools proportionally to their sizes (largest remainder).

  Every pool gets at least 1 and at most its size; the total is K whenever
  ``len(pools) <= K <= sum(sizes)``.

  Raises:
    ValueError: K smaller than the number of pools or larger than all clients.
  """
  total = sum(pool_sizes)
  if not len(pool_sizes) <= clients_per_round <= total:
    raise ValueError(f"clients_per_round={clients_per_round} must be between the number of "
                     f"pools ({len(pool_sizes)}) and the number of clients ({total}).")
  share = [clients_per_round * n / total for n in pool_sizes]
  ks = [min(n, max(1, int(q))) for n, q in zip(pool_sizes, share)]
  # Hand out (or take back) the difference one client at a time, largest remainder first.
  order = sorted(range(len(ks)), key=lambda i: share[i] - ks[i], reverse=True)
  step = 1 if sum(ks) < clients_per_round else -1
  turn = 0
  while sum(ks) != clients_per_round:
    i = (order if step > 0 else order[::-1])[turn % len(ks)]
    if (step > 0 and ks[i] < pool_sizes[i]) or (step < 0 and ks[i] > 1):
      ks[i] += step
    turn += 1
  return ks


def zoo_functions(arch: str, spec: DataSpec):
  """``(apply_fn, embed_fn, init_params)`` of a MODEL_ZOO architecture."""
  model = models.build_zoo_model(arch, spec.num_classes)
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  embed_fn = lambda p, x: model.apply({"params": p}, x, return_embedding=True)
  init_params = lambda rng: models.init_params(model, rng, spec.input_shape)
  return apply_fn, embed_fn, init_params


def fedavg_per_pool(archs: Sequence[str], spec: DataSpec, clients_per_round: int, *,
                    server_opt: optax.GradientTransformation = optax.sgd(1.0),
                    client_ids: Sequence[np.ndarray] | None = None,
                    **fedavg_kwargs: Any) -> FederatedAlgorithm:
  """One FedAvg model per architecture; server state is a tuple of FedAvg states.

  Args:
    archs: distinct MODEL_ZOO names, one per pool (also the pool names).
    spec: data shapes.
    clients_per_round: K, split over pools by :func:`pool_cohort_sizes`.
    client_ids: optional explicit assignment (default round-robin).
    fedavg_kwargs: client_lr, batch_size, epochs, ... as :func:`fedavg`.
  """
  if len(set(archs)) != len(archs):
    raise ValueError(f"architectures {list(archs)} repeat; list each MODEL_ZOO name once.")
  ids = list(client_ids) if client_ids is not None else assign_round_robin(
      spec.num_clients, len(archs))
  ks = pool_cohort_sizes([len(i) for i in ids], clients_per_round)
  algs, pools = [], []
  for p, (arch, members, k) in enumerate(zip(archs, ids, ks)):
    apply_fn, _, init_params = zoo_functions(arch, spec)
    alg = fedavg(apply_fn, init_params, server_opt=server_opt, **fedavg_kwargs)
    algs.append(alg)
    pools.append(Pool(
        name=arch, client_ids=members, clients_per_round=k,
        client_update=lambda b, c, d, r, i, alg=alg, p=p: alg.client_update(b[p], c, d, r, i),
        init_client=alg.init_client,
        eval_params=lambda s, c, alg=alg, p=p: alg.eval_params(s[p], c),
        apply_fn=apply_fn, global_model=True,
        local=alg.local._replace(
            begin=lambda b, *a, alg=alg, p=p: alg.local.begin(b[p], *a),
            finish=lambda b, *a, alg=alg, p=p: alg.local.finish(b[p], *a))))

  def init(rng):
    return tuple(a.init(jax.random.fold_in(rng, p)) for p, a in enumerate(algs))

  def server_update(state, uploads, weights, infos, rng):
    new, metrics = [], {}
    for p, a in enumerate(algs):
      s, m = a.server_update(state[p], uploads[p], weights[p], infos[p], rng)
      new.append(s)
      metrics.update({f"{pools[p].name}/{k}": v for k, v in m.items()})
    return tuple(new), metrics

  return FederatedAlgorithm(
      name="fedavg_pools", init=init, init_client=None, client_update=None,
      server_update=server_update, eval_params=None, apply_fn=None, pools=tuple(pools))


@register("fedavg_pools", fedavg_per_pool, fixed=("client_ids",), pooled=True)
def _build(ctx, **knobs):
  """One FedAvg model per ``--config.archs`` entry (the engine's client and server knobs)."""
  return fedavg_per_pool(ctx.archs, ctx.spec, ctx.clients_per_round, server_opt=ctx.server_opt(),
                         **ctx.client, **knobs)
