"""Knowledge codistillation between two model pools (CODIST).

Paper: Lichtarge, Amid, Kumar, Yang, Anil, Mathews, "Heterogeneous Federated
Learning Using Knowledge Codistillation", arXiv 2310.02549. Only the abstract
and a summary could be read (``docs/decisions.md#knowledge-codistillation``),
so the exact update rules below are OURS, written from
that summary. What the paper states and we follow:

* two client pools by capacity: a small model trained by FedAvg on ALL
  clients, a large model trained by FedAvg on the high-capacity clients only;
  each pool has a FedAdam server optimizer;
* the two SERVER models teach each other by knowledge distillation on an
  unlabeled server dataset (KL divergence between output distributions,
  Adam distillation optimizer), without sharing parameters;
* PERIODIC CODIST distills at fixed intervals (the paper: s = 200 steps every
  p = 200 rounds); MERGED CODIST treats the model difference after a round of
  distillation as a gradient and interpolates it with the FedAvg
  pseudo-gradient by alpha in [0, 1] every round.

[ours] (``docs/decisions.md`` marks them so; none of them is read from the paper):

* Distillation loss: ``T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T))``
  (Hinton et al.'s T^2 scaling), t = teacher logits (stop-gradient), s =
  student logits, temperature T (:func:`distill_loss`).
* Both directions start from the PRE-distillation models: the small model's
  teacher is the frozen large model and vice versa, for all s steps
  (:func:`codistill`). Adam (fresh state each time) on minibatches of B_d
  server examples drawn without replacement per step (all N_s when B_d >= N_s).
* PERIODIC: in 0-based round r, FedAdam applies the FedAvg pseudo-gradient;
  then, only if ``r % p == 0``, both models are replaced by their s-step
  distilled versions; FedAdam's moments are kept.
* MERGED: every round, from the round-start server models theta (the ones
  the clients trained from), ``Delta_distill = theta - theta_after_s_steps``
  and the FedAdam input is ``(1 - alpha) Delta_FedAvg + alpha Delta_distill``.
  Read literally, the summary gives ``Delta_distill = theta_after - theta``; the engine's
  pseudo-gradients are ``theta - theta_client`` (a descent direction is
  SUBTRACTED by the optimizer), so we use the same sign for both terms.
  alpha = 0 is bit for bit this module's FedAdam-only mode, and equals two
  independent FedAdam runs (``fedavg_per_pool``) bit for bit after round 0
  and to ~1 ulp later (XLA fuses FedAdam differently in the two programs;
  tested).
* Both distillations run under ``lax.cond`` (MERGED before FedAdam, PERIODIC
  after it), so a non-distilling round costs nothing; the mode and knobs are
  runtime values in the server state (:class:`CodistKnobs`), so FedAvg,
  PERIODIC and MERGED share one compiled round.
* The server dataset is built in ``data/`` (:mod:`fedjax_sim.data.server_sets`):
  a held-out slice of the training split that no client ever holds
  (``build_codist_data``, the report's driver); or, through the CLI
  (``--config.data.server_size``), the clients' training rows the data
  pipeline holds out (``FederatedData.aux["server_x"]``), hidden from local
  training by ``aux["client_keep"]``.

Axis legend: C clients, C_p clients of a pool, K cohort, N examples per client,
N_s server (distillation) examples, B batch, B_d distillation batch, L classes.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import seeding
from fedjax_sim.errors import ConfigError
from fedjax_sim.protocol import FederatedAlgorithm, Pool, tree_weighted_mean
from fedjax_sim.algorithms.fedavg import ServerState, fedavg
from fedjax_sim.algorithms.pooled import DataSpec, zoo_functions
from fedjax_sim.algorithms.registry import register

MODES = ("fedavg", "periodic", "merged")


class CodistKnobs(NamedTuple):
  """Runtime CODIST settings, held in the server state (all scalars).

  Keeping them in the state lets one compiled round run FedAvg, PERIODIC and
  MERGED and any (alpha, p, s, lr, T) without recompiling (and be vmapped).

  Attributes:
    merged: bool []: MERGED CODIST (takes precedence over ``periodic``).
    periodic: bool []: PERIODIC CODIST.
    alpha: float32 []: MERGED weight of Delta_distill.
    period: int32 []: p.   steps: int32 []: s.
    lr: float32 []: Adam distillation learning rate.
    temperature: float32 []: T.
    salt: int32 []: folded into the distillation key (a run seed).
  """
  merged: jax.Array
  periodic: jax.Array
  alpha: jax.Array
  period: jax.Array
  steps: jax.Array
  lr: jax.Array
  temperature: jax.Array
  salt: jax.Array


def make_knobs(mode: str = "merged", *, alpha: float = 0.5, period: int = 10, steps: int = 5,
               lr: float = 1e-3, temperature: float = 2.0, salt: int = 0) -> CodistKnobs:
  """:class:`CodistKnobs` for ``mode`` in fedavg | periodic | merged.

  Raises:
    ValueError: unknown mode or out-of-range knobs.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown CODIST mode '{mode}'; set --config.codist.mode to one of "
                     f"{', '.join(MODES)}.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha} must be in [0, 1]; set --config.codist.alpha.")
  if period < 1 or steps < 0 or temperature <= 0 or lr < 0:
    raise ValueError(f"period={period} must be >= 1, distill_steps={steps} >= 0, "
                     f"distill_lr={lr} >= 0 and temperature={temperature} > 0 (--config.codist.*).")
  return CodistKnobs(jnp.asarray(mode == "merged"), jnp.asarray(mode == "periodic"),
                     jnp.float32(alpha), jnp.int32(period), jnp.int32(steps), jnp.float32(lr),
                     jnp.float32(temperature), jnp.int32(salt))


class CodistState(NamedTuple):
  """Server state.

  Attributes:
    small: ServerState(params, opt_state) of the small model (pool 0).
    large: ServerState(params, opt_state) of the large model (pool 1).
    knobs: :class:`CodistKnobs`.
    server_x: float32 [N_s, *input_shape], the unlabeled server dataset.
  """
  small: ServerState
  large: ServerState
  knobs: CodistKnobs
  server_x: jax.Array


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                 temperature: float) -> jax.Array:
  """``T^2 * mean_b KL(softmax(t_b/T) || softmax(s_b/T))`` [ours: the T^2 scaling].

  Args:
    student_logits: float32 [B_d, L].
    teacher_logits: float32 [B_d, L]; treated as constants (stop-gradient).
    temperature: T > 0.

  Returns:
    float32 [] scalar.
  """
  t = jax.lax.stop_gradient(teacher_logits) / temperature
  log_pt = jax.nn.log_softmax(t, axis=-1)
  log_ps = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


def codistill(apply_small: Callable, apply_large: Callable, params_small: Any, params_large: Any,
              server_x: jax.Array, rng: jax.Array, *, steps: Any, lr: Any, temperature: Any,
              batch_size: int) -> tuple[Any, Any, dict]:
  """Bidirectional distillation: s Adam steps for each model, teachers frozen.

  The small model is the student of the pre-distillation large model and the
  large model the student of the pre-distillation small model [ours].

  Args:
    apply_small, apply_large: ``(params, x [B_d, ...]) -> logits [B_d, L]``.
    params_small, params_large: the pre-distillation server models.
    server_x: float32 [N_s, ...], the unlabeled server dataset.
    rng: PRNG key for minibatch draws (step i uses ``fold_in(rng, i)``).
    steps: s (int or int32 [] array).  lr: Adam learning rate (float or
      float32 []; Adam with optax defaults b1=0.9, b2=0.999, eps=1e-8, fresh
      state).  temperature: T.
    batch_size: B_d (static); B_d >= N_s means the full set every step.

  Returns:
    ``(small', large', metrics)``; metrics float32 [] ``kl_small``,
    ``kl_large``: mean distillation loss over the s steps.
  """
  n = server_x.shape[0]
  adam = optax.scale_by_adam()

  def batch(i):
    if batch_size >= n:
      return server_x
    idx = jax.random.choice(jax.random.fold_in(rng, i), n, (batch_size,), replace=False)
    return server_x[idx]

  def step(i, carry):
    ps, pl, os_, ol, ks, kl = carry
    x = batch(i)
    t_large = apply_large(params_large, x)  # frozen pre-distillation teachers
    t_small = apply_small(params_small, x)
    ls, gs = jax.value_and_grad(lambda p: distill_loss(apply_small(p, x), t_large, temperature))(ps)
    ll, gl = jax.value_and_grad(lambda p: distill_loss(apply_large(p, x), t_small, temperature))(pl)
    us, os_ = adam.update(gs, os_, ps)
    ul, ol = adam.update(gl, ol, pl)
    sgd = lambda p, u: jax.tree.map(lambda a, b: a - lr * b, p, u)
    return sgd(ps, us), sgd(pl, ul), os_, ol, ks + ls, kl + ll

  init = (params_small, params_large, adam.init(params_small), adam.init(params_large),
          jnp.float32(0.0), jnp.float32(0.0))
  ps, pl, _, _, ks, kl = jax.lax.fori_loop(0, steps, step, init)
  s = jnp.maximum(jnp.asarray(steps, jnp.float32), 1.0)
  return ps, pl, {"kl_small": ks / s, "kl_large": kl / s}


def _select(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def codist(small_arch: str, large_arch: str, spec: DataSpec, *, server_x: Any,
           mode: str = "merged", alpha: float = 0.5, period: int = 10,
           distill_steps: int = 5, distill_lr: float = 1e-3, temperature: float = 2.0,
           distill_batch: int = 64, k_small: int = 10, k_large: int = 5,
           large_fraction: float = 0.3, large_ids: Optional[Sequence[int]] = None,
           pool_seed: int = 0,
           server_opt: optax.GradientTransformation = optax.adam(1e-2, eps=1e-3),
           small_ids: Optional[Sequence[int]] = None, client_keep: Optional[Any] = None,
           **fedavg_kwargs: Any) -> FederatedAlgorithm:
  """CODIST: FedAvg (FedAdam) per pool plus server-side codistillation.

  One round, with theta the round-start server models, Delta_FedAvg the
  example-weighted mean client pseudo-gradient (theta - theta_k) of a pool,
  and D(.) = :func:`codistill` (both models at once, s steps):

  * fedavg:   theta <- FedAdam(theta, Delta_FedAvg)
  * periodic: theta' <- FedAdam(theta, Delta_FedAvg); theta <- D(theta') if
    r % p == 0 else theta' (the FedAdam moments are not touched by D)
  * merged:   theta <- FedAdam(theta, (1 - alpha) Delta_FedAvg + alpha (theta - D(theta)))

  The mode and knobs live in the server state (:class:`CodistKnobs`); the
  arguments here only set their initial values, so one compiled round serves
  every mode (``state.server._replace(knobs=make_knobs(...))``).

  Args:
    small_arch, large_arch: distinct MODEL_ZOO names (also the pool names,
      as in :func:`~fedjax_sim.algorithms.pooled.fedavg_per_pool`, so a pool
      samples the same cohorts as there).
    spec: data shapes.
    server_x: float32 [N_s, *input_shape], unlabeled server data (stored in
      the server state).
    mode: ``fedavg`` (no distillation), ``periodic`` or ``merged``.
    alpha: MERGED interpolation weight of Delta_distill.
    period: p; PERIODIC distills in 0-based rounds r with ``r % p == 0``.
    distill_steps: s.  distill_lr: Adam lr.  temperature: T.
    distill_batch: B_d (static).
    k_small, k_large: clients per round K_p of each pool (K_large at most
      the number of high-capacity clients).
    large_fraction: share of high-capacity clients when ``large_ids`` is
      not given: ``max(1, round(large_fraction * C))`` clients drawn at random
      (NumPy stream ``pools`` of ``pool_seed``, :mod:`fedjax_sim.seeding`).
    large_ids: int [C_large] global ids of the high-capacity clients
      (overrides ``large_fraction``).
    pool_seed: seed of that draw (the registry builder passes the run seed).
    server_opt: the server optimizer of BOTH models (FedAdam by default; one
      state per model).
    small_ids: int [C_small] global ids of the small pool (default: all C
      clients; the domain-shift experiment uses the complement of large_ids).
    client_keep: optional bool [C, N] (host array): rows a client may train on.
      Rows set False (the server's held-out examples in the CLI path) are
      masked out of local training and out of the aggregation weights.
    fedavg_kwargs: client_lr, batch_size, epochs, ... as :func:`fedavg`.

  Raises:
    ValueError: unknown mode, equal architectures, or bad knob values.
  """
  if large_ids is None:
    if not 0.0 < large_fraction <= 1.0:
      raise ValueError(f"large_fraction={large_fraction} must be in (0, 1] (the share of "
                       "high-capacity clients); set --config.codist.large_fraction.")
    n_large = max(1, int(round(large_fraction * spec.num_clients)))
    large_ids = np.sort(seeding.numpy_rng(pool_seed, "pools").permutation(
        spec.num_clients)[:n_large])
  knobs0 = make_knobs(mode, alpha=alpha, period=period, steps=distill_steps, lr=distill_lr,
                      temperature=temperature)
  if small_arch == large_arch:
    raise ValueError(f"small and large architecture are both '{small_arch}'; pick two MODEL_ZOO "
                     "names (e.g. --config.archs=\"('mlp_s', 'mlp_l')\").")
  small_ids = np.arange(spec.num_clients, dtype=np.int32) if small_ids is None else np.asarray(
      small_ids, np.int32)
  large_ids = np.asarray(large_ids, np.int32)
  k_large = min(k_large, len(large_ids))
  server_x0 = np.asarray(server_x, np.float32)
  if server_x0.shape[1:] != tuple(spec.input_shape):
    raise ValueError(f"server_x has example shape {server_x0.shape[1:]}, the data "
                     f"{tuple(spec.input_shape)}.")
  keep = None if client_keep is None else jnp.asarray(client_keep, bool)
  keep_count = None if keep is None else jnp.sum(keep, axis=1).astype(jnp.float32)

  archs = (small_arch, large_arch)
  fns = [zoo_functions(a, spec) for a in archs]
  algs = [fedavg(apply_fn, init_params, server_opt=server_opt, **fedavg_kwargs)
          for apply_fn, _, init_params in fns]
  apply_small, apply_large = fns[0][0], fns[1][0]

  def pool_update(alg, p):
    def update(bcast, cstate, data, rng, info):
      if keep is not None:  # hide the server's rows from this client
        m = data.mask & keep[info.client_id]
        data = data._replace(mask=m, num_examples=jnp.sum(m).astype(data.num_examples.dtype))
      return alg.client_update(bcast[p], cstate, data, rng, info)
    return update

  pools = tuple(
      Pool(name=arch, client_ids=ids, clients_per_round=k, client_update=pool_update(alg, p),
           init_client=alg.init_client, eval_params=lambda s, c, p=p: s[p].params,
           apply_fn=fns[p][0], global_model=True)
      for p, (arch, ids, k, alg) in enumerate(zip(archs, (small_ids, large_ids),
                                                  (k_small, k_large), algs)))

  def init(rng):
    models = [a.init(jax.random.fold_in(rng, p)) for p, a in enumerate(algs)]
    return CodistState(*models, knobs0, jnp.asarray(server_x0))

  def adam_step(st: ServerState, g):
    updates, opt_state = server_opt.update(g, st.opt_state, st.params)
    return ServerState(optax.apply_updates(st.params, updates), opt_state)

  def server_update(state: CodistState, uploads, weights, infos, rng):
    kn = state.knobs
    if keep_count is not None:
      weights = tuple(jnp.where(i.valid, keep_count[i.client_ids], 0.0) for i in infos)
    deltas = [tree_weighted_mean(u, w) for u, w in zip(uploads, weights)]
    models = (state.small, state.large)
    key = jax.random.fold_in(rng, kn.salt)

    def distill(srcs):
      ps, pl, m = codistill(apply_small, apply_large, *srcs, state.server_x, key, steps=kn.steps,
                            lr=kn.lr, temperature=kn.temperature, batch_size=distill_batch)
      return (ps, pl), m

    def skip(srcs):
      return srcs, {"kl_small": jnp.float32(0.0), "kl_large": jnp.float32(0.0)}

    # MERGED: distill the round-start models theta and mix the two deltas.
    theta = tuple(st.params for st in models)
    distilled, dm_merged = jax.lax.cond(kn.merged, distill, skip, theta)
    grads = []
    for d, t, n in zip(deltas, theta, distilled):
      mixed = jax.tree.map(lambda g, a, b: (1.0 - kn.alpha) * g + kn.alpha * (a - b), d, t, n)
      # With alpha = 0, mixed == d bit for bit; the barrier keeps the mixing
      # out of FedAdam's fused moment update so both modes share that fusion.
      grads.append(_select(kn.merged, jax.lax.optimization_barrier(mixed), d))
    new = [adam_step(st, g) for st, g in zip(models, grads)]
    # PERIODIC: every p rounds, replace the FedAdam-updated models by their
    # distilled versions (the FedAdam moments are untouched).
    do_periodic = kn.periodic & ~kn.merged & (infos[0].round % kn.period == 0)
    distilled, dm_periodic = jax.lax.cond(do_periodic, distill, skip,
                                          tuple(st.params for st in new))
    new = [st._replace(params=p) for st, p in zip(new, distilled)]
    dm = jax.tree.map(jnp.add, dm_merged, dm_periodic)  # at most one is non-zero
    do = kn.merged | do_periodic
    metrics = {f"{a}/update_norm": optax.global_norm(d) for a, d in zip(archs, deltas)}
    metrics.update({f"distill/{k}": v for k, v in dm.items()})
    metrics["distill/distilled"] = do.astype(jnp.float32)
    return state._replace(small=new[0], large=new[1]), metrics

  return FederatedAlgorithm(
      name=f"codist_{mode}", init=init, init_client=None, client_update=None,
      server_update=server_update, eval_params=None, apply_fn=None, pools=pools)


# ---------------------------------------------------------------------------------------------
# Evaluation of the two global models, and the config builder.


def make_predict(algorithm: FederatedAlgorithm):
  """Jitted ``predict(server_state, x float32 [N, ...]) -> (pred_small int32 [N], pred_large [N])``.

  The engine's pooled evaluation reports each pool's clients' own test splits;
  CODIST's two global models are also evaluated on the global test set (and on
  class subsets for domain shift) from these predictions.
  """
  pools = algorithm.pools

  def predict(state, x):
    return tuple(jnp.argmax(p.apply_fn(p.eval_params(state, None), x), -1).astype(jnp.int32)
                 for p in pools)

  return jax.jit(predict)


@register("codist", codist, pooled=True,
          fixed=("k_small", "large_ids", "pool_seed", "small_ids", "client_keep"))
def _build(ctx, **knobs):
  """CODIST from a run config: pools ``--config.archs`` = (small, large); knobs
  ``--config.codist.<knob>``; the server set from the data
  (``--config.data.server_size``: ``ctx.data.aux["server_x"]``, hidden from the
  clients by ``aux["client_keep"]``); K_small = ``--config.clients_per_round``;
  high-capacity clients drawn with the run seed (``large_fraction``).

  Raises:
    ConfigError: not two architectures, or no server set in the data.
  """
  if len(ctx.archs) != 2:
    raise ConfigError(f"codist trains two models, small then large, but --config.archs="
                      f"{tuple(ctx.archs)}; set --config.archs=\"('mlp_s', 'mlp_l')\".")
  aux = getattr(ctx.data, "aux", None) or {}
  if "server_x" not in aux:
    raise ConfigError("codist distills on an unlabeled server set the clients do not hold; set "
                      "--config.data.server_size (e.g. 250) so the data pipeline holds one out.")
  return codist(*ctx.archs, ctx.spec, server_x=aux["server_x"],
                client_keep=aux.get("client_keep"), k_small=ctx.clients_per_round,
                pool_seed=ctx.seed, server_opt=ctx.server_opt(), **ctx.client, **knobs)
