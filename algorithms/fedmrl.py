"""FedMRL as a model pool of split models (a baseline of FedRE, arXiv 2511.22265).

Yi et al., "Federated Model Heterogeneous Matryoshka Representation Learning",
arXiv 2406.00488 (NeurIPS 2024); public implementation in HtFLlib
(github.com/TsingZ0/HtFLlib, ``clientmrl.py``, ``servermrl.py``).

* Every client k holds its own heterogeneous split model F_k (a MODEL_ZOO
  extractor + RM to d2 = D + its own head D -> L, :mod:`~fedjax_sim.algorithms.rm`)
  and a personalized projector P_k (one linear layer d1 + d2 -> d2); all
  clients share a small homogeneous model G (the split model of ``global_arch``
  with RM to d1: extractor G_ex and head G_hd, d1 -> L) that the server averages.
* Representation fusion [paper]: R_G = G_ex(x) in R^{d1}, R_F = F_k,ex(x) in R^{d2},
  R~ = P_k([R_G, R_F]) in R^{d2}.
* Matryoshka representations [paper]: the nested prefix R~[:d1] (coarse) goes to
  the global head, the whole R~ (fine) to the local head:
  y^G = G_hd(R~[:d1]), y^F = F_k,hd(R~); the local loss is
  m1 CE(y^G, y) + m2 CE(y^F, y) [paper; defaults m1 = m2 = 1, the code's plain
  sum], minimized jointly over G, F_k and P_k by local SGD with one step size
  [code: three SGD optimizers with the client's lr].
* Upload: the trained copy of G; the server sets G to the example-weighted mean
  of the cohort's copies (FedAvg's n_k / n). Clients keep F_k and P_k.
* Inference [paper; code]: y^F of the fused representation (G's extractor from
  the server, the client's own F_k and P_k); the global head is not used.

Where we differ:

* From the code: HtFLlib never saves the trained projector (``proj`` is loaded
  from its initial state at every round, so P_k stays at its initialization
  across rounds and is trained only within a round); we keep P_k as client state,
  as the paper describes. HtFLlib averages G unweighted (1 / |S_t|); we weight
  by example counts, as FedAvg and our LG-FedAvg. The projector and the heads
  are initialized as our other split models' heads (LeCun normal kernel, zero
  bias), not with PyTorch's U(+-1/sqrt(fan_in)).
* Dimensions: the paper's d2 is the local models' representation dim, here the
  common split-model dim D (``dim``, as HtFLlib's ``feature_dim``); d1 defaults
  to D / 4 = 8, the ratio of HtFLlib's defaults (``sub_feature_dim`` 128,
  ``feature_dim`` 512). G's architecture defaults to the first pool's (HtFLlib:
  model 0 of the list, unless ``global_model`` is set).

Server metrics: ``comm/upload_scalars`` and ``comm/broadcast_scalars`` (K |G| each).
Axis legend: K cohort, B batch, d1 the homogeneous model's dim, D = d2 the local dim,
L classes.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.checks import concrete
from fedjax_sim.protocol import (FederatedAlgorithm, client_optimizer, local_train,
                                 masked_cross_entropy, tree_weighted_mean)
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.head_training import register_split_model, split_kw, valid_slots


def fuse(global_model: rm_lib.SplitModel, local_model: rm_lib.SplitModel, params: dict,
         x: jax.Array) -> jax.Array:
  """The fused representation R~ = P_k([G_ex(x), F_k,ex(x)]), float32 [B, D].

  Args:
    params: {"global": G's split-model params, "local": F_k's, "proj": {"kernel"
      [d1 + D, D], "bias" [D]}}.  x: float32 [B, ...].
  """
  r = jnp.concatenate([global_model.features(params["global"], x),
                       local_model.features(params["local"], x)], axis=-1)
  return rm_lib.apply_head(params["proj"], r)


def matryoshka_logits(global_model: rm_lib.SplitModel, local_model: rm_lib.SplitModel,
                      params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(y^G = G_hd(R~[:d1]), y^F = F_k,hd(R~)), logits float32 [B, L] each."""
  r = fuse(global_model, local_model, params, x)
  d1 = global_model.dim
  return (rm_lib.apply_head(params["global"]["head"], r[:, :d1]),
          rm_lib.apply_head(params["local"]["head"], r))


def mrl_loss(global_model, local_model, params, x, y, mask, m1: float = 1.0,
             m2: float = 1.0) -> jax.Array:
  """m1 CE(y^G, y) + m2 CE(y^F, y), each the mean over the real rows (mask bool [B])."""
  logits_g, logits_f = matryoshka_logits(global_model, local_model, params, x)
  return m1 * masked_cross_entropy(logits_g, y, mask) + m2 * masked_cross_entropy(
      logits_f, y, mask)


def fedmrl(archs: Sequence[str], spec: Any, clients_per_round: int, *, d1: int = 8,
           m1: float = 1.0, m2: float = 1.0, global_arch: str = "", dim: int = 32,
           rm: str = "avg", client_ids=None, **kw) -> FederatedAlgorithm:
  """FedMRL (see the module docstring) over model pools of split models.

  Args:
    archs, spec, clients_per_round, client_ids: the pools
      (:func:`~fedjax_sim.algorithms.rm.split_pools`).
    d1: the shared model's representation dim, the Matryoshka prefix (1 <= d1 <= dim).
    m1, m2: the weights of the global-head and the local-head losses (>= 0).
    global_arch: MODEL_ZOO name of the shared model (empty: ``archs[0]``).
    dim: D = d2, the local models' common representation dim.  rm: the RM kind (both models).
    kw: client_lr, batch_size, epochs, local_steps, client_momentum, lr_decay.

  Raises:
    ValueError: d1 outside [1, dim], a negative m1 or m2, an unknown architecture.
  """
  if not 1 <= d1 <= dim:
    raise ValueError(f"FedMRL d1={d1} must be in [1, dim={dim}] (the Matryoshka prefix of the "
                     "fused representation); set --config.fedmrl.d1.")
  for name, v in (("m1", m1), ("m2", m2)):
    if concrete(v) and v < 0:
      raise ValueError(f"FedMRL {name}={v} must be >= 0; set --config.fedmrl.{name}.")
  tkw = split_kw(dict(kw, dim=dim, rm=rm))
  gmodel = rm_lib.split_model(global_arch or archs[0], spec.input_shape, spec.num_classes, d1, rm)
  g_size = int(sum(np.prod(a.shape) for a in jax.tree.leaves(
      jax.eval_shape(gmodel.init, jax.random.PRNGKey(0)))))

  def client_update(model, global_params, state, data, rng, info):
    params = {**state, "global": global_params}
    loss = lambda p, x, y, m, r: mrl_loss(gmodel, model, p, x, y, m, m1, m2)
    opt = client_optimizer(tkw["client_lr"], tkw["client_momentum"], tkw["lr_decay"], info.round)
    res = local_train(loss, params, opt, data, rng, epochs=tkw["epochs"],
                      batch_size=tkw["batch_size"], local_steps=tkw["local_steps"])
    new = res.params
    return new["global"], {"local": new["local"], "proj": new["proj"]}, res.metrics

  pools, mods = rm_lib.split_pools(archs, spec, clients_per_round, client_update, dim=dim, rm=rm,
                                   global_head=False, client_ids=client_ids)

  def pool_parts(m):
    def init_client(rng):
      k_local, k_proj = jax.random.split(rng)
      return {"local": m.init(k_local), "proj": rm_lib.init_head(k_proj, d1 + dim, dim)}

    def apply(p, x):
      return matryoshka_logits(gmodel, m, p, x)[1]
    return init_client, apply

  def with_parts(pool, m):
    init_client, apply = pool_parts(m)
    return pool._replace(init_client=init_client, apply_fn=apply,
                         eval_params=lambda s, c: {**c, "global": s})

  pools = tuple(with_parts(pool, m) for pool, m in zip(pools, mods))

  def server_update(state, uploads, weights, infos, rng):
    models, valid = rm_lib.concat_pools(uploads), valid_slots(infos)
    w = jnp.concatenate(weights) * valid
    new = jax.lax.cond(jnp.sum(w) > 0, lambda: tree_weighted_mean(models, w), lambda: state)
    k = jnp.sum(valid).astype(jnp.float32)
    return new, {"comm/upload_scalars": k * g_size, "comm/broadcast_scalars": k * g_size}

  return FederatedAlgorithm(
      name="fedmrl", init=gmodel.init, init_client=None, client_update=None,
      server_update=server_update, eval_params=None, apply_fn=None, personalized=True,
      pools=pools)


register_split_model("fedmrl", fedmrl)
