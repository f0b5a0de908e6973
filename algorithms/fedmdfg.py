"""FedMDFG: federated multiple gradient descent with fair guidance, in one jitted round.

Pan, Wang, Li, Wang, Tang, Zhao, "FedMDFG: Federated Learning with
Multi-Gradient Descent and Fair Guidance", AAAI 2023 (doi
10.1609/aaai.v37i8.26122), a fairness baseline of CoRe-Fed (arXiv 2602.00647).
The update below is our statement of the public implementation
(github.com/zibinpan/FedMDFG, ``fedplat/algorithm/FedMDFG/FedMDFG.py`` and
``common/utils.py``), read to understand it; nothing is copied.

One round, for the K sampled clients (L_i a client's mean training loss):

1. Each client sends l_i = L_i(w) and g_i = grad L_i(w) over ALL its training
   examples (one full-batch gradient; no local epochs).
2. Bookkeeping: the server keeps each client's expected loss (the running mean
   of the losses that did not increase, the first loss on first contact). If
   some but not all clients report a loss above their expectation, the fair
   guidance is forced on.
3. "Live" clients have ||g_i|| > 1e-6; their gradients are rescaled to the mean
   norm. Fair guidance is on when the angle between the loss vector l and the
   guidance vector u = 1/sqrt(n) exceeds theta (degrees; 11.25 = pi/16), or is
   forced. It adds the row h @ G with h = normalize((u . l^) l^ - u), l^ = l/||l||.
4. Historical fairness: the (rescaled) gradients of last round's live clients
   that are not in this round join the rows.
5. d = the minimum-norm point of the convex hull of the rows (the MGDA quadratic
   program min_{lambda in simplex} ||lambda^T V||^2, solved here by accelerated
   projected gradient, :func:`min_norm_element`). d is rescaled to the norm of
   the mean live gradient; while that d ascends along some row by more than
   1e-6 it is halved, down to twice the unscaled norm, below which the
   unscaled d is kept.
6. Line search on the step size eta, w' = w - eta d, the cohort evaluating its
   losses at each candidate (the round's second client phase,
   :attr:`~fedjax_sim.protocol.ServerInfo.query`): eta starts at 2^s lr when
   every one of last round's live clients is in this cohort (no historical
   rows), else at lr, and halves
   while eta >= 0.5^s lr / scale (scale = ||d|| / ||d_unscaled||). The first eta
   with l_i - l_i' >= eta beta c_i for every live client (c = -(G d) with the
   rescaled gradients G, beta = 1e-4) and, when the guidance is on, a larger cosine between the loss
   vector and u, is taken. Otherwise: the largest candidate that lowered the
   summed loss, else the candidate with the smallest summed loss.

lr is the client learning rate with its per-round decay (``client_lr *
lr_decay^t``), as in the released code.

Faithful quirks of the released code, kept by default (``strict=False``): the
sufficient-decrease test has c_i = -(g_i . d) <= 0 on its right side (a
slightly RELAXED Armijo test, not the textbook l_i' <= l_i - eta beta g_i . d);
the old cosine is divided by the SUM of the losses instead of their L2 norm,
which makes the cosine test pass for any candidate with two or more positive
losses. ``strict=True`` uses the textbook Armijo sign (still with the
rescaled gradients in c) and the L2 norm on both sides. [ours] where the
released code would divide by zero, the round keeps w (no line search, eta =
0, ``candidates`` = 0): a zero min-norm point (Pareto-stationary gradients,
e.g. two exactly opposite ones; below 1e-5 times the rows' common norm, since
float32 reaches 0 only up to rounding), or a zero fair-guidance vector h with the
guidance on (forced: one live client, or all live losses equal). ||h|| is
the sine of the angle between l and u; below 1e-5 (float32 rounding of equal
losses) it counts as zero. Such a round still advances ALL the bookkeeping,
as the released code does at the end of every round with a live client: the
expected losses and join counts, and last round's ids, live mask and
gradients (the historical rows of the next round). Only a round without any
live client keeps the last round's rows (the released code returns before
storing them; its expected losses still advance). When no step
passes and a candidate's loss is NaN, the fallbacks skip it (the released
code's ``np.argmin`` would pick it).

Per-client bookkeeping lives in server arrays: expected loss [C], join
count [C], last round's ids, live mask and rescaled gradients [K, P] (P =
number of parameters), so the padded cohort the server update receives must
have at least K slots. Communication per real cohort client: P + 1 up (g_i,
l_i) and P down (w); when the line search runs, d (P) down once, then per
candidate eta one scalar down and one loss up. ``server/comm/*`` report
these exact counts (a round that keeps w sends no d).

Axis legend: C clients, K cohort, N examples, B batch, P parameters.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fedjax_sim.protocol import FederatedAlgorithm
from fedjax_sim.algorithms.registry import register
from fedjax_sim.checks import concrete

PyTree = Any
_TINY = 1e-12
# Below this, a quantity that is zero in exact arithmetic (sin of the fair
# angle, the min-norm point relative to the rows' norm) counts as zero:
# float32 reaches it only up to rounding.
_ROUNDING = 1e-5


class FedMDFGState(NamedTuple):
  """Server state.

  Attributes:
    params: the global model w.
    expected_loss: float32 [C], each client's expected loss (0 if never seen).
    join_count: int32 [C], rounds each client has joined.
    last_ids: int32 [K], last round's cohort (real clients first).
    last_live: bool [K], which of them were live (||g|| > 1e-6).
    last_grads: float32 [K, P], their rescaled gradients (rows of the next
      round's historical-fairness term).
  """
  params: PyTree
  expected_loss: jax.Array
  join_count: jax.Array
  last_ids: jax.Array
  last_live: jax.Array
  last_grads: jax.Array


def min_norm_element(vecs: jax.Array, mask: jax.Array, iters: int = 1000) -> jax.Array:
  """Minimum-norm point of the convex hull of the masked rows of ``vecs``.

  Solves min_{lambda >= 0, sum lambda = 1, lambda_i = 0 off mask}
  ||lambda^T V||^2 (MGDA; Desideri 2012, Sener & Koltun arXiv 1810.04650) by
  FISTA with Euclidean projection onto the simplex (``optax.projections``) on
  the Gram matrix V V^T scaled by its largest diagonal entry.

  Args:
    vecs: float32 [M, P], the rows V.
    mask: bool [M], rows taking part (at least one; all False gives lambda = 0).
    iters: projected-gradient iterations (the error falls as 1/iters^2).

  Returns:
    lambda float32 [M] (zero off ``mask``); the point is ``lambda @ vecs``.
  """
  m = mask.astype(jnp.float32)
  gram = vecs @ vecs.T * m[:, None] * m[None, :]
  gram = gram / jnp.maximum(jnp.max(jnp.diag(gram)), _TINY)
  lip = 2.0 * jnp.maximum(jnp.max(jnp.linalg.eigvalsh(gram)), _TINY)

  def project(v):
    return optax.projections.projection_simplex(jnp.where(mask, v, -1e9)) * m

  lam0 = m / jnp.maximum(jnp.sum(m), 1.0)

  def body(_, carry):
    lam, y, t = carry
    new = project(y - (2.0 * gram @ y) / lip)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    return new, new + ((t - 1.0) / t_new) * (new - lam), t_new

  lam, _, _ = jax.lax.fori_loop(0, iters, body, (lam0, lam0, jnp.float32(1.0)))
  return lam


def step_accepted(loss: jax.Array, new_loss: jax.Array, eta: jax.Array, c: jax.Array,
                  live: jax.Array, u: jax.Array, fair_on: jax.Array, *, beta: float,
                  strict: bool) -> jax.Array:
  """The line search's acceptance test for one candidate step eta.

  Args:
    loss: float32 [K], the live clients' losses at w (0 for others).
    new_loss: float32 [K], their losses at w - eta d (0 for others).
    eta: float32 [], the candidate step.  c: float32 [K], -(g_i . d).
    live: bool [K].  u: float32 [K], the unit guidance vector over live clients.
    fair_on: bool [], whether the cosine test applies.
    beta: sufficient-decrease constant.  strict: see :func:`fedmdfg`.

  Returns:
    bool []: every live client passes l_i - l_i' >= eta beta c_i (strict:
    >= -eta beta c_i) and, if ``fair_on``, cos(l', u) > cos(l, u), where the
    released code (strict=False) computes the old cosine as (l . u) / sum(l).
  """
  bound = eta * beta * (-c if strict else c)
  decrease = jnp.all(jnp.where(live, loss - new_loss >= bound, True))
  if strict:
    cos0 = (loss @ u) / jnp.maximum(jnp.linalg.norm(loss), _TINY)
  else:
    cos0 = (loss @ u) / jnp.maximum(jnp.sum(loss), _TINY)
  cos = (new_loss @ u) / jnp.maximum(jnp.linalg.norm(new_loss), _TINY)
  return decrease & jnp.where(fair_on, cos > cos0, True)


def fedmdfg(apply_fn: Callable, init_params: Callable[[jax.Array], PyTree], *,
            num_clients: int, clients_per_round: int, client_lr: float, batch_size: int,
            lr_decay: float = 1.0, theta: float = 11.25, s: int = 5, beta: float = 1e-4,
            strict: bool = False, qp_iters: int = 1000, name: str = "fedmdfg"
            ) -> FederatedAlgorithm:
  """FedMDFG (see the module docstring for the update).

  Args:
    apply_fn: ``(params, x [B, ...]) -> logits [B, L]``.
    init_params: ``rng -> params``.
    num_clients: C.  clients_per_round: K (the sampler's).
    client_lr: lr, the line search's base step (decayed by ``lr_decay`` per round).
    batch_size: B, the batch of the clients' full-data loss/gradient passes
      (the result does not depend on it).
    theta: tolerable fairness angle in DEGREES, 0 < theta < 90 (11.25 = pi/16).
    s: line-search range, candidates from 2^s lr down to 0.5^s lr / scale; s >= 0.
    beta: sufficient-decrease constant of the line search.
    strict: textbook Armijo and cosine tests instead of the released code's.
    qp_iters: iterations of :func:`min_norm_element`.

  Uploads: ``{"grad": params pytree, "loss": float32 []}``. Server metrics:
  ``step_size`` (eta), ``step_multiplier`` (eta / lr), ``candidates`` (line
  search evaluations), ``fair_guidance`` (1 if on), ``fairness_angle`` (deg),
  ``same_cohort``, ``live_clients``, ``update_norm``, ``comm/upload_scalars``,
  ``comm/broadcast_scalars``.

  Raises:
    ValueError: at build time, theta outside (0, 90), s < 0 or not an integer,
      K < 1. While tracing ``client_update``: client arrays whose row count N
      is not a multiple of ``batch_size`` (pack with ``multiple=batch_size``).
      While tracing ``server_update``: no second client phase
      (``info.query`` is None; run the round through
      ``fedjax_sim.round.make_round``), or a padded cohort with fewer than K
      slots (``info.valid.shape[0] < clients_per_round``; e.g.
      ``check_algorithm`` without ``clients_per_round=K``).
  """
  if concrete(theta) and not 0.0 < theta < 90.0:
    raise ValueError(f"FedMDFG theta={theta} must be an angle in degrees in (0, 90) "
                     "(paper: 11.25 = pi/16); set --config.fedmdfg.theta.")
  if int(s) != s or s < 0:
    raise ValueError(f"FedMDFG s={s} must be an integer >= 0 (paper: 5); set "
                     "--config.fedmdfg.s.")
  if clients_per_round < 1:
    raise ValueError(f"FedMDFG needs clients_per_round >= 1, got {clients_per_round}.")
  C, K, s = num_clients, clients_per_round, int(s)

  def init(rng):
    params = init_params(rng)
    n_params = ravel_pytree(params)[0].shape[0]
    return FedMDFGState(params, jnp.zeros((C,), jnp.float32), jnp.zeros((C,), jnp.int32),
                        jnp.zeros((K,), jnp.int32), jnp.zeros((K,), bool),
                        jnp.zeros((K, n_params), jnp.float32))

  def batch_sums(fn, init_acc, data):
    """sum over the client's ceil(n/B) batches of ``fn(x, y, m)`` (real rows come first)."""
    n = data.num_examples

    def one(i, acc):
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * batch_size, batch_size)
      return jax.tree.map(jnp.add, acc, fn(sl(data.x), sl(data.y), sl(data.mask)))

    return jax.lax.fori_loop(0, (n + batch_size - 1) // batch_size, one, init_acc)

  def summed_loss(p, x, y, m):
    ce = optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y)
    return jnp.sum(ce * m.astype(ce.dtype))

  def full_loss(params, data):
    total = batch_sums(lambda x, y, m: summed_loss(params, x, y, m), jnp.float32(0.0), data)
    return total / jnp.maximum(jnp.sum(data.mask), 1).astype(jnp.float32)

  def client_update(w, client_state, data, rng, info):
    del rng, info
    if data.y.shape[0] % batch_size:
      raise ValueError(f"client arrays have N={data.y.shape[0]} rows, not a multiple of "
                       f"batch_size={batch_size}; pack with multiple=batch_size.")
    zero = (jnp.float32(0.0), jax.tree.map(jnp.zeros_like, w))
    total, gsum = batch_sums(lambda x, y, m: jax.value_and_grad(summed_loss)(w, x, y, m),
                             zero, data)
    n = jnp.maximum(jnp.sum(data.mask), 1).astype(jnp.float32)
    loss, grad = total / n, jax.tree.map(lambda g: g / n, gsum)
    return ({"grad": grad, "loss": loss}, client_state,
            {"loss": loss, "grad_norm": optax.global_norm(grad)})

  def client_query(candidate, client_state, data, info):
    del client_state, info
    return full_loss(candidate, data)

  def server_update(st, uploads, weights, info, rng):
    del weights, rng
    slots = info.valid.shape[0]
    if slots < K:
      raise ValueError(f"FedMDFG was built with clients_per_round={K} (its state keeps "
                       f"[{K}]-shaped last-round arrays) but the server update got a cohort of "
                       f"{slots} slots; pass clients_per_round={K} to check_algorithm, or "
                       "build FedMDFG with the sampler's clients_per_round (K).")
    if info.query is None:
      raise ValueError("FedMDFG's line search needs the round's second client phase "
                       "(ServerInfo.query); run it through fedjax_sim.round.make_round.")
    order = jnp.argsort(~info.valid, stable=True)[:K]  # the K real slots first
    ids, valid = info.client_ids[order], info.valid[order]
    flat = jax.vmap(lambda g: ravel_pytree(g)[0])(uploads["grad"])[order]  # [K, P]
    loss = uploads["loss"][order]  # [K]
    _, unravel = ravel_pytree(st.params)

    # 2. expected-loss bookkeeping over every selected client
    exp_i, cnt = st.expected_loss[ids], st.join_count[ids]
    first, improved = cnt == 0, loss <= exp_i
    new_exp = jnp.where(first, loss,
                        jnp.where(improved, (exp_i * cnt + loss) / (cnt + 1), exp_i))
    n_inc, n_valid = jnp.sum(valid & ~first & ~improved), jnp.sum(valid)
    forced = (n_inc > 0) & (n_inc < n_valid)
    scatter = jnp.where(valid, ids, C)
    expected_loss = st.expected_loss.at[scatter].set(new_exp, mode="drop")
    join_count = st.join_count.at[scatter].add(1, mode="drop")

    # 4. last round's live clients absent from this round
    present = jnp.any((st.last_ids[:, None] == ids[None, :]) & valid[None, :], axis=1)
    hist = st.last_live & ~present
    same_cohort = ~jnp.any(hist)

    # 3. live clients, gradients rescaled to the mean norm, fair guidance
    norms = jnp.linalg.norm(flat, axis=1)
    live = valid & (norms > 1e-6)
    n_live = jnp.sum(live)
    any_live = n_live > 0
    lv = live.astype(jnp.float32)
    mean_norm = jnp.sum(norms * lv) / jnp.maximum(n_live, 1)
    g = flat / jnp.maximum(norms, _TINY)[:, None] * mean_norm * lv[:, None]
    u = lv / jnp.sqrt(jnp.maximum(n_live, 1).astype(jnp.float32))
    l_live = loss * lv
    l_hat = l_live / jnp.maximum(jnp.linalg.norm(l_live), _TINY)
    angle = jnp.degrees(jnp.arccos(jnp.clip(l_hat @ u, -1.0, 1.0)))
    fair_on = (angle > theta) | forced

    # 5. the min-norm direction over [G; fair row; historical rows]
    keep_norm = lambda a: a * (jnp.linalg.norm(a, axis=1) /
                               (jnp.linalg.norm(a, axis=1) + 1e-6))[:, None]
    gq = keep_norm(g)
    h = (u @ l_hat) * l_hat - u
    h_norm = jnp.linalg.norm(h)  # sin(angle); 0 for one live client or equal losses
    zero_fair = fair_on & (h_norm < _ROUNDING)
    h = jnp.where(zero_fair, 0.0, h / jnp.maximum(h_norm, _TINY))
    rows = jnp.concatenate([gq, (h @ gq)[None], keep_norm(st.last_grads)])  # [2K+1, P]
    row_mask = jnp.concatenate([live, fair_on[None], hist])
    lam = min_norm_element(rows, row_mask, qp_iters)
    d0 = lam @ rows
    d0_norm = jnp.linalg.norm(d0)
    mean_g_norm = jnp.linalg.norm(jnp.sum(g, 0) / jnp.maximum(n_live, 1))
    d1 = d0 / jnp.maximum(d0_norm, _TINY) * mean_g_norm
    # The released code's guard against float error: while some row ascends
    # along d (by > 1e-6), halve d down to twice the unscaled norm, else fall
    # back to the unscaled d.
    ascent = lambda dd: jnp.max(jnp.where(row_mask, -(rows @ dd), -jnp.inf)) > 1e-6

    def halve(carry):
      dd, _ = carry
      big = jnp.linalg.norm(dd) > 2.0 * d0_norm
      return jnp.where(big, dd / 2.0, d0), ~big

    d, _ = jax.lax.while_loop(lambda c: ~c[1] & ascent(c[0]), halve, (d1, jnp.bool_(False)))
    # A zero min-norm point (Pareto-stationary rows) up to float32 rounding:
    # relative to the rows' common norm, as for h above.
    moved = any_live & ~zero_fair & (d0_norm > _ROUNDING * mean_norm)
    d = jnp.where(moved, d, 0.0)
    scale = jnp.where(moved, jnp.linalg.norm(d) / jnp.maximum(d0_norm, _TINY), 1.0)

    # 6. line search with the cohort's losses at w - eta d
    base = client_lr * (lr_decay ** info.round.astype(jnp.float32) if lr_decay != 1.0 else 1.0)
    base = jnp.asarray(base, jnp.float32)
    c = -(g @ d)  # [K]
    start = jnp.where(same_cohort, 2.0 ** s * base, base)
    min_lr = jnp.where(moved, 0.5 ** s * base / scale, jnp.inf)
    total0 = jnp.sum(l_live)
    d_tree = unravel(d)

    def losses_at(eta):
      cand = jax.tree.map(lambda p, dd: p - eta * dd, st.params, d_tree)
      return info.query(cand)[order]

    def cond(carry):
      eta, accepted = carry[0], carry[1]
      return (~accepted) & (eta >= min_lr)

    def body(carry):
      eta, _, found, first_dec, best_eta, best_total, n_eval = carry
      lq = losses_at(eta) * lv
      total = jnp.sum(lq)
      ok = step_accepted(l_live, lq, eta, c, live, u, fair_on, beta=beta, strict=strict)
      dec = total < total0
      first_dec = jnp.where(~found & dec, eta, first_dec)
      better = total < best_total
      return (jnp.where(ok, eta, eta / 2), ok, found | dec, first_dec,
              jnp.where(better, eta, best_eta), jnp.where(better, total, best_total),
              n_eval + 1)

    init_carry = (start, jnp.bool_(False), jnp.bool_(False), start, start,
                  jnp.float32(jnp.inf), jnp.int32(0))
    eta, accepted, found, first_dec, best_eta, _, n_eval = jax.lax.while_loop(
        cond, body, init_carry)
    eta = jnp.where(accepted, eta, jnp.where(found, first_dec,
                                             jnp.where(n_eval > 0, best_eta, eta)))
    eta = jnp.where(moved, eta, 0.0)
    params = jax.tree.map(lambda p, dd: p - eta * dd, st.params, d_tree)

    # bookkeeping advances whenever a client is live, also when w is kept
    keep = lambda new, old: jnp.where(any_live, new, old)
    new_state = FedMDFGState(params, expected_loss, join_count, keep(ids, st.last_ids),
                             keep(live, st.last_live), keep(g, st.last_grads))
    n_params = flat.shape[1]
    nv = n_valid.astype(jnp.float32)
    metrics = {
        "step_size": eta, "step_multiplier": eta / base, "candidates": n_eval,
        "fair_guidance": fair_on, "fairness_angle": angle, "same_cohort": same_cohort,
        "live_clients": n_live, "update_norm": eta * jnp.linalg.norm(d),
        # up: g_i, l_i, one loss per candidate; down: w, d if any candidate ran, each eta
        "comm/upload_scalars": nv * (n_params + 1 + n_eval),
        "comm/broadcast_scalars": nv * (n_params * (1 + (n_eval > 0)) + n_eval),
    }
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

  return FederatedAlgorithm(
      name=name, init=init, init_client=lambda rng: (), client_update=client_update,
      server_update=server_update, eval_params=lambda st, c: st.params, apply_fn=apply_fn,
      broadcast=lambda st: st.params, client_query=client_query)


@register("fedmdfg", fedmdfg)
def _build(ctx, **knobs):
  """FedMDFG with ``--config.fedmdfg.{theta, s, beta, strict, qp_iters}``; C and K from the
  engine; the client's momentum and epochs do not apply (one full-batch gradient step)."""
  c = ctx.client
  return fedmdfg(*ctx.model_fns(), num_clients=ctx.spec.num_clients,
                 clients_per_round=ctx.clients_per_round, client_lr=c["client_lr"],
                 batch_size=c["batch_size"], lr_decay=c["lr_decay"], **knobs)
