"""FedMDFG: the min-norm QP, the jitted round (second client phase) vs a NumPy loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

from conftest import tiny_config
from fedjax_sim import seeding
from fedjax_sim.protocol import ServerInfo
from fedjax_sim.algorithms.fedmdfg import fedmdfg, min_norm_element
from fedjax_sim.round import init_state, make_round
from fedjax_sim.launch.experiment import build_experiment


def qp_reference(rows: np.ndarray) -> np.ndarray:
  """min ||lam^T V||^2 on the simplex by SLSQP in float64; returns the point lam^T V."""
  m = rows.shape[0]
  gram = rows @ rows.T
  res = minimize(lambda x: x @ gram @ x, np.full(m, 1.0 / m), jac=lambda x: 2 * gram @ x,
                 bounds=[(0, 1)] * m, constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
                 method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
  return res.x @ rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_norm_element_matches_scipy(seed):
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(7, 5)).astype(np.float32)
  rows[2] = -rows[0] * 0.3 + 0.1  # a conflicting pair
  mask = np.array([1, 1, 1, 0, 1, 1, 0], bool)
  lam = np.asarray(min_norm_element(jnp.asarray(rows), jnp.asarray(mask)))
  assert np.all(lam[~mask] == 0) and np.all(lam >= 0)
  np.testing.assert_allclose(lam.sum(), 1.0, rtol=1e-5)
  want = qp_reference(rows[mask].astype(np.float64))
  np.testing.assert_allclose(lam @ rows, want, atol=2e-4)
  # KKT: every active row has v_i . d >= ||d||^2 (d is a common descent direction).
  d = lam @ rows
  assert np.all(rows[mask] @ d >= d @ d - 1e-4)


def test_min_norm_element_inside_the_hull_is_zero():
  rows = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
  lam = min_norm_element(rows, jnp.array([True, True, False]))
  np.testing.assert_allclose(np.asarray(lam @ rows), 0.0, atol=1e-6)


# ---------------------------------------------------------------------------
# A NumPy reference of the public FedMDFG round (github.com/zibinpan/FedMDFG,
# train_a_round + line_search), client by client, in float64, with losses and
# gradients from pluggable per-client functions.

class PublicFedMDFG:
  def __init__(self, num_clients, k, lr, decay=1.0, theta=11.25, s=5, beta=1e-4):
    self.k, self.lr0, self.decay, self.theta, self.s, self.beta = k, lr, decay, theta, s, beta
    self.exp, self.count = np.zeros(num_clients), np.zeros(num_clients, int)
    self.last = None  # (ids, rescaled gradients) of last round's live clients
    self.round = 0

  def step(self, w, ids, loss, grad):
    """One round from w (float64 [P]) for cohort ``ids``; returns (w', info)."""
    lr = self.lr0 * self.decay ** self.round
    self.round += 1
    l = np.array([loss(w, i) for i in ids])
    G = np.stack([grad(w, i) for i in ids])
    increase = 0
    for j, i in enumerate(ids):
      if self.count[i] == 0:
        self.exp[i] = l[j]
      elif l[j] <= self.exp[i]:
        self.exp[i] = (self.exp[i] * self.count[i] + l[j]) / (self.count[i] + 1)
      else:
        increase += 1
      self.count[i] += 1
    forced = 0 < increase < self.k
    kept = lambda branch, fair: (w, {"branch": branch, "fair": fair, "candidates": 0})
    hist = None
    if self.last is not None:
      gone = [j for j, i in enumerate(self.last[0]) if i not in ids]
      hist = self.last[1][gone] if gone else None
    same = hist is None
    norms = np.linalg.norm(G, axis=1)
    live = np.flatnonzero(norms > 1e-6)
    if live.size == 0:  # the public code returns before storing last round's rows
      return kept("no live client", False)
    G, l, norms = G[live], l[live], norms[live]
    G = G / norms[:, None] * norms.mean()
    # The public code stores these after its step; a round that keeps w stores them too.
    self.last = (list(np.asarray(ids)[live]), G)
    u = np.ones(live.size) / np.sqrt(live.size)
    l_hat = l / np.linalg.norm(l)
    fair = np.degrees(np.arccos(np.clip(l_hat @ u, -1, 1))) > self.theta or forced
    keep_norm = lambda a: a * (np.linalg.norm(a, axis=1) / (np.linalg.norm(a, axis=1) + 1e-6))[:, None]
    rows = [keep_norm(G)]
    if fair:
      h = (u @ l_hat) * l_hat - u
      if np.linalg.norm(h) < 1e-5:  # the public code divides 0/0 here; ours keeps w
        return kept("zero fair vector", True)
      rows.append((h / np.linalg.norm(h)) @ rows[0][None])
    if hist is not None:
      rows.append(keep_norm(hist))
    V = np.concatenate(rows)
    d0 = qp_reference(V)
    # Pareto-stationary (up to float32 rounding, relative to the rows' common
    # norm); the public code divides 0/0 here; ours keeps w
    if np.linalg.norm(d0) < 1e-5 * norms.mean():
      return kept("zero min-norm point", fair)
    d = d0 / np.linalg.norm(d0) * np.linalg.norm(G.mean(0))
    while np.max(-(V @ d)) > 1e-6:
      if np.linalg.norm(d) > 2 * np.linalg.norm(d0):
        d = d / 2
      else:
        d = d0
        break
    scale = np.linalg.norm(d) / np.linalg.norm(d0)
    c = -(G @ d)
    eta = 2.0 ** self.s * lr if same else lr
    old_cos = (l @ u) / l.sum()
    tried, branch = [], None
    while eta >= 0.5 ** self.s * lr / scale:
      lq = np.array([loss(w - eta * d, ids[j]) for j in live])
      tried.append((eta, lq.sum()))
      if np.all(l - lq >= eta * self.beta * c) and (
          not fair or (lq @ u) / np.linalg.norm(lq) - old_cos > 0):
        branch = "accepted"
        break
      eta /= 2
    if branch is None:
      dec = [e for e, tot in tried if tot < l.sum()]
      branch = "first decrease" if dec else "smallest loss"
      eta = dec[0] if dec else tried[int(np.argmin([t for _, t in tried]))][0]
    return w - eta * d, {"branch": branch, "fair": fair, "same": same, "forced": forced,
                         "candidates": len(tried)}


@pytest.mark.parametrize("clients,per_round", [(12, 4), (6, 6)])
def test_round_equals_numpy_client_loop(clients, per_round):
  """The jitted round (vmapped clients, line search through ServerInfo.query) ==
  a client-by-client NumPy/SciPy run of the same procedure, over 3 rounds;
  (6, 6) has the same cohort every round (line search from 2^s lr)."""
  cfg = tiny_config(algorithm="fedmdfg", clients_per_round=per_round, chunk_size=0,
                    client_lr=0.5)
  cfg.data.num_clients = clients
  exp = build_experiment(cfg)
  alg = exp.algorithm
  state = init_state(alg, exp.sampler, clients, seed=0, mesh=exp.mesh)
  round_fn = make_round(alg, exp.sampler, seed=0, mesh=exp.mesh, donate=False)
  flat, unravel = ravel_pytree(state.server.params)
  data = exp.data.train

  @jax.jit
  def loss_of(p_flat, x, y, mask):
    ce = -jax.nn.log_softmax(alg.apply_fn(unravel(p_flat), x))[jnp.arange(y.shape[0]), y]
    return jnp.sum(ce * mask) / jnp.sum(mask)

  client = lambda i: (data.x[i], data.y[i], data.mask[i].astype(jnp.float32))
  loss = lambda w, i: float(loss_of(jnp.asarray(w, jnp.float32), *client(i)))
  grad = lambda w, i: np.asarray(jax.grad(loss_of)(jnp.asarray(w, jnp.float32), *client(i)),
                                 np.float64)
  ref = PublicFedMDFG(clients, per_round, cfg.client_lr)
  w = np.asarray(flat, np.float64)
  seen_same = False
  for r in range(3):
    cohort, _ = exp.sampler.sample(seeding.round_subkeys(0, r)[0], jnp.int32(r), state.sampler)
    w, info = ref.step(w, [int(c) for c in np.asarray(cohort)], loss, grad)
    seen_same |= info["same"] and r > 0
    state, metrics = round_fn(state, data)
    assert float(metrics["server/candidates"][0]) == info["candidates"]
    assert float(metrics["server/fair_guidance"][0]) == float(info["fair"])
    np.testing.assert_allclose(np.asarray(ravel_pytree(state.server.params)[0]), w,
                               atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state.server.expected_loss), ref.exp, rtol=1e-5)
  assert seen_same == (clients == per_round)


# Synthetic per-client losses (float64): quadratic + sine bumps; client 5 is flat.
_P, _C = 6, 7
_RNG = np.random.default_rng(0)
_A, _B = _RNG.normal(size=(_C, _P)), _RNG.normal(size=(_C, _P))
_S, _CC = _RNG.uniform(0.2, 3, _C), _RNG.uniform(0, 2, _C)


def _loss(w, i):
  if i == 5:
    return 2.0
  return 0.5 * _S[i] * np.sum((w - _A[i]) ** 2) + _CC[i] * np.sin(_B[i] @ w) + 3.0


def _grad(w, i):
  if i == 5:
    return np.zeros(_P)
  return _S[i] * (w - _A[i]) + _CC[i] * np.cos(_B[i] @ w) * _B[i]


def test_server_update_matches_public_procedure_on_synthetic_losses():
  """server_update with a NumPy ``query`` == the public procedure, round by round,
  across cohorts with padding slots in shuffled order (junk uploads), a
  zero-gradient client, lr decay and several (K, lr, theta, s): every
  line-search outcome occurs (accepted, first-decrease and smallest-loss
  fallbacks), and the forced guidance."""
  branches, forced = set(), False
  for k, pad, lr, decay, theta, s in [(3, 0, 0.5, 1.0, 11.25, 5), (3, 2, 0.5, 0.9, 11.25, 5),
                                      (4, 1, 2.0, 1.0, 11.25, 1), (3, 3, 0.05, 0.95, 5.0, 3),
                                      (7, 1, 1.0, 1.0, 11.25, 5), (4, 0, 0.3, 1.0, 1.0, 2)]:
    rng = np.random.default_rng(k * 100 + pad)
    alg = fedmdfg(None, lambda r: {"w": jnp.zeros(_P)}, num_clients=_C, clients_per_round=k,
                  client_lr=lr, batch_size=1, lr_decay=decay, theta=theta, s=s)
    st = alg.init(jax.random.PRNGKey(0))
    ref = PublicFedMDFG(_C, k, lr, decay, theta, s)

    def answer(cand, slots, valid):  # the cohort's losses at a candidate (NumPy, float64)
      return np.array([_loss(np.asarray(cand, np.float64), int(i)) if v else 55.0
                       for i, v in zip(slots, valid)], np.float32)

    @jax.jit  # one compilation per (K, padding, knobs): the cohort is an argument
    def server_step(st, uploads, r, slots, valid, alg=alg, width=k + pad):
      query = lambda cand: jax.pure_callback(
          answer, jax.ShapeDtypeStruct((width,), jnp.float32), cand["w"], slots, valid)
      info = ServerInfo(r, slots, valid.astype(jnp.int32), valid, query)
      return alg.server_update(st, uploads, None, info, None)

    for r in range(5):  # later rounds of (7, ...) near stationarity hit float32 limits
      ids = list(rng.choice(_C, k, replace=False))
      perm = rng.permutation(k + pad)
      slots = np.array(ids + [ids[-1]] * pad)[perm]
      valid = np.array([True] * k + [False] * pad)[perm]
      w = np.asarray(st.params["w"], np.float64)
      grads = np.stack([_grad(w, i) if v else rng.normal(size=_P) * 9 for i, v in zip(slots, valid)])
      losses = np.array([_loss(w, i) if v else 77.0 for i, v in zip(slots, valid)])

      uploads = {"grad": {"w": jnp.asarray(grads, jnp.float32)},
                 "loss": jnp.asarray(losses, jnp.float32)}
      st, m = server_step(st, uploads, jnp.int32(r), jnp.asarray(slots, jnp.int32),
                          jnp.asarray(valid))
      w_ref, out = ref.step(w, [int(i) for i in slots[valid]], _loss, _grad)
      branches.add(out["branch"])
      forced |= out.get("forced", False)
      np.testing.assert_allclose(np.asarray(st.params["w"]), w_ref, atol=1e-4, rtol=1e-3)
      np.testing.assert_allclose(np.asarray(st.expected_loss), ref.exp, rtol=1e-5)
      if "candidates" in out:
        assert int(m["candidates"]) == out["candidates"]
        assert bool(m["fair_guidance"]) == out["fair"]
      st = st._replace(params={"w": jnp.asarray(w_ref, jnp.float32)})  # continue in step
  assert {"accepted", "first decrease", "smallest loss"} <= branches, branches
  assert forced


# Losses that reach the rounds which keep w (float64): 0 and 1 have exactly opposite
# gradients at w = 0; 2 is flat (never live); 3 and 4 have equal losses at w = 0.
_KA, _KB, _KE = np.array([0.5, -1.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.0, 0.0]), \
    np.array([2.0, 1.0, 0.0, 0.0])
_KEPT_CENTERS = {0: (_KA, 1.0), 1: (-_KA, 1.0), 3: (_KB, 3.0), 4: (_KE, 3.0)}


def _kept_loss(w, i):
  if i == 2:
    return 2.0
  a, c = _KEPT_CENTERS[i]
  return 0.5 * np.sum((w - a) ** 2) + c


def _kept_grad(w, i):
  return np.zeros_like(w) if i == 2 else w - _KEPT_CENTERS[i][0]


@pytest.mark.parametrize("scenario,rounds", [
    # round 1: rows g_0 = -g_1, min-norm point 0; round 2 uses g_1 (round 1) as a historical row
    ("opposite gradients", [(0.0 * _KB, [0, 1], "zero min-norm point"),
                            (np.array([1.0, 0.0, 1.0, 0.0]), [0, 3], None)]),
    # round 2: client 3 above its expected loss, 2 not: guidance forced with one live client
    ("one live client", [(0.0 * _KB, [3, 2], None), (-_KE, [3, 2], "zero fair vector"),
                         (0.5 * _KB, [4, 2], None)]),
    # round 2: equal losses 5.5, 5.5; 3 above its expected 4.6, 4 below its 6.4: forced
    ("equal losses", [(1.8 * _KB, [3, 4], None), (0.0 * _KB, [3, 4], "zero fair vector"),
                      (0.5 * _KB, [3, 0], None)]),
])
def test_rounds_that_keep_w_still_advance_the_bookkeeping(scenario, rounds):
  """A zero min-norm point or a zero fair vector (guidance on) keeps w, runs no
  line search and still stores the round's ids and gradients for the next
  round's historical rows, as the NumPy reference of the public code does; the
  next round's step (which uses those rows) matches the reference."""
  k = 2
  alg = fedmdfg(None, lambda r: {"w": jnp.zeros(4)}, num_clients=5, clients_per_round=k,
                client_lr=0.5, batch_size=1)
  st = alg.init(jax.random.PRNGKey(0))
  ref = PublicFedMDFG(5, k, 0.5)
  for r, (w, ids, want_branch) in enumerate(rounds):
    st = st._replace(params={"w": jnp.asarray(w, jnp.float32)})
    w = np.asarray(st.params["w"], np.float64)

    def answer(cand, ids=ids):
      return np.array([_kept_loss(np.asarray(cand, np.float64), i) for i in ids], np.float32)

    query = lambda cand, answer=answer: jax.pure_callback(
        answer, jax.ShapeDtypeStruct((k,), jnp.float32), cand["w"])
    info = ServerInfo(jnp.int32(r), jnp.asarray(ids, jnp.int32), jnp.ones((k,), jnp.int32),
                      jnp.ones((k,), bool), query)
    uploads = {"grad": {"w": jnp.asarray([_kept_grad(w, i) for i in ids], jnp.float32)},
               "loss": jnp.asarray([_kept_loss(w, i) for i in ids], jnp.float32)}
    st, m = jax.jit(lambda st, up: alg.server_update(st, up, None, info, None))(st, uploads)
    w_ref, out = ref.step(w, ids, _kept_loss, _kept_grad)
    if want_branch is not None:
      assert out["branch"] == want_branch, (scenario, r, out)
      np.testing.assert_array_equal(np.asarray(st.params["w"]), np.asarray(w, np.float32))
      assert float(m["step_size"]) == 0.0 and float(m["update_norm"]) == 0.0
      assert float(m["comm/broadcast_scalars"]) == k * 4  # w only: no d, no eta
    else:
      assert out["branch"] not in ("zero min-norm point", "zero fair vector"), out
      n = out["candidates"]
      assert n >= 1
      # up: g_i (P = 4), l_i and one loss per candidate; down: w, d, one eta per candidate
      assert float(m["comm/upload_scalars"]) == k * (4 + 1 + n)
      assert float(m["comm/broadcast_scalars"]) == k * (2 * 4 + n)
    assert int(m["candidates"]) == out["candidates"]
    assert bool(m["fair_guidance"]) == out["fair"]
    np.testing.assert_allclose(np.asarray(st.params["w"]), w_ref, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(st.expected_loss), ref.exp, rtol=1e-5)
    live = np.asarray(st.last_live)
    assert [int(i) for i in np.asarray(st.last_ids)[live]] == [int(i) for i in ref.last[0]]
    np.testing.assert_allclose(np.asarray(st.last_grads)[live], ref.last[1], rtol=1e-5,
                               atol=1e-6)


def test_pareto_stationary_up_to_rounding_keeps_w():
  """Three unit gradients 120 degrees apart: their min-norm point is 0, which
  float32 reaches only up to rounding (|d0| ~ 1e-9, not 0); the round keeps w
  instead of searching along that noise, as the reference does."""
  k = 3
  ang = np.radians([90.0, 210.0, 330.0])
  grads = np.stack([np.cos(ang), np.sin(ang)], 1)  # [3, 2], sum 0
  alg = fedmdfg(None, lambda r: {"w": jnp.ones(2)}, num_clients=3, clients_per_round=k,
                client_lr=0.5, batch_size=1)
  st = alg.init(jax.random.PRNGKey(0))
  info = ServerInfo(jnp.int32(0), jnp.arange(k), jnp.ones((k,), jnp.int32),
                    jnp.ones((k,), bool), lambda cand: jnp.ones((k,), jnp.float32))
  uploads = {"grad": {"w": jnp.asarray(grads, jnp.float32)}, "loss": jnp.ones((k,))}
  st2, m = jax.jit(lambda st, up: alg.server_update(st, up, None, info, None))(st, uploads)
  np.testing.assert_array_equal(np.asarray(st2.params["w"]), np.ones(2, np.float32))
  assert float(m["step_size"]) == 0.0 and int(m["candidates"]) == 0
  ref = PublicFedMDFG(3, k, 0.5)
  w_ref, out = ref.step(np.ones(2), [0, 1, 2], lambda w, i: 1.0, lambda w, i: grads[i])
  assert out["branch"] == "zero min-norm point"
  np.testing.assert_array_equal(w_ref, np.ones(2))


def test_check_algorithm_names_clients_per_round():
  """FedMDFG's state is [K]-shaped: check_algorithm with a cohort other than K
  fails with an AlgorithmError that says so, and passes with K."""
  from fedjax_sim.checks import AlgorithmError, check_algorithm
  cfg = tiny_config(algorithm="fedmdfg", clients_per_round=5)
  exp = build_experiment(cfg)
  state = init_state(exp.algorithm, exp.sampler, cfg.data.num_clients, seed=0, mesh=exp.mesh)
  with pytest.raises(AlgorithmError, match=r"clients_per_round=5.*cohort of 2 slots") as err:
    check_algorithm(exp.algorithm, state, exp.data.train)  # the default 2
  assert "check_algorithm(..., clients_per_round=K)" in str(err.value)
  check_algorithm(exp.algorithm, state, exp.data.train, clients_per_round=5)
  check_algorithm(exp.algorithm, state, exp.data.train, clients_per_round=8)  # padded cohort


def test_server_update_rejects_a_cohort_smaller_than_k():
  alg = fedmdfg(None, lambda r: {"w": jnp.zeros(3)}, num_clients=6, clients_per_round=4,
                client_lr=0.1, batch_size=1)
  st = alg.init(jax.random.PRNGKey(0))
  info = ServerInfo(jnp.int32(0), jnp.arange(3), jnp.ones(3, jnp.int32), jnp.ones(3, bool),
                    lambda cand: jnp.zeros(3))
  uploads = {"grad": {"w": jnp.ones((3, 3))}, "loss": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"clients_per_round=4.*3 slots"):
    alg.server_update(st, uploads, None, info, None)


def test_bad_knobs_name_the_config_key():
  args = dict(num_clients=4, clients_per_round=2, client_lr=0.1, batch_size=5)
  with pytest.raises(ValueError, match="fedmdfg.theta"):
    fedmdfg(None, None, theta=90.0, **args)
  with pytest.raises(ValueError, match="fedmdfg.s"):
    fedmdfg(None, None, s=-1, **args)



def test_step_acceptance_code_vs_strict():
  """The released code's tests (strict=False) against the textbook ones."""
  from fedjax_sim.algorithms.fedmdfg import step_accepted
  live = jnp.array([True, True])
  u = jnp.array([1.0, 1.0]) / np.sqrt(2)
  loss = jnp.array([1.0, 2.0])
  c = jnp.array([-1.0, -1.0])
  kw = dict(eta=jnp.float32(1.0), c=c, live=live, u=u, fair_on=jnp.bool_(False), beta=0.1)
  # A slight increase (+0.05) passes the code's relaxed bound (>= -0.1), not Armijo's (>= 0.1).
  up = loss + 0.05
  assert bool(step_accepted(loss, up, strict=False, **kw))
  assert not bool(step_accepted(loss, up, strict=True, **kw))
  # Both decrease a lot but the loss vector turns away from u: only the code's cosine passes.
  kw["fair_on"] = jnp.bool_(True)
  less_fair = jnp.array([0.5, 1.9])
  assert bool(step_accepted(loss, less_fair, strict=False, **kw))
  assert not bool(step_accepted(loss, less_fair, strict=True, **kw))
  fairer = jnp.array([0.9, 1.5])
  assert bool(step_accepted(loss, fairer, strict=True, **kw))
