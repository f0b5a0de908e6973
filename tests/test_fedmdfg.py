"""FedMDFG: the min-norm QP, the jitted round (second client phase) vs a NumPy loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

from conftest import tiny_config
from fedjax_sim.algorithms.fedmdfg import fedmdfg, min_norm_element
from fedjax_sim.round import init_state, make_round
from fedjax_sim.simulation import build_experiment


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
# NumPy reference of one FedMDFG round, client by client (the released code's
# procedure, as stated in algorithms/fedmdfg.py).

def reference_round(params, ref, cohort, data, apply_fn, *, lr, theta=11.25, s=5, beta=1e-4):
  flat0, unravel = ravel_pytree(params)
  flat0 = np.asarray(flat0, np.float64)

  def client_loss(p_flat, cid):
    d = jax.tree.map(lambda a: a[cid], data)
    n = int(d.num_examples)
    logits = apply_fn(unravel(jnp.asarray(p_flat, jnp.float32)), d.x[:n])
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(n), d.y[:n]])

  losses, grads = [], []
  for cid in cohort:
    lval, g = jax.value_and_grad(client_loss)(jnp.asarray(flat0, jnp.float32), cid)
    losses.append(float(lval))
    grads.append(np.asarray(g, np.float64))
  l, G = np.array(losses), np.stack(grads)
  increase = 0
  for i, cid in enumerate(cohort):
    if ref["count"][cid] == 0:
      ref["exp"][cid] = l[i]
    elif l[i] <= ref["exp"][cid]:
      ref["exp"][cid] = (ref["exp"][cid] * ref["count"][cid] + l[i]) / (ref["count"][cid] + 1)
    else:
      increase += 1
    ref["count"][cid] += 1
  forced = 0 < increase < len(cohort)
  hist = [g for cid, g in ref["last"] if cid not in cohort]
  same = not hist
  norms = np.linalg.norm(G, axis=1)
  G = G / norms[:, None] * norms.mean()  # every client is live here
  n = len(cohort)
  u = np.ones(n) / np.sqrt(n)
  l_hat = l / np.linalg.norm(l)
  angle = np.degrees(np.arccos(np.clip(l_hat @ u, -1, 1)))
  fair = angle > theta or forced
  rows = [G]
  if fair:
    h = (u @ l_hat) * l_hat - u
    rows.append((h / np.linalg.norm(h)) @ G[None])
  if hist:
    rows.append(np.stack(hist))
  V = np.concatenate(rows)
  d0 = qp_reference(V)
  d = d0 / np.linalg.norm(d0) * np.linalg.norm(G.mean(0))
  while np.max(-(V @ d)) > 1e-6:
    if np.linalg.norm(d) > 2 * np.linalg.norm(d0):
      d = d / 2
    else:
      d = d0
      break
  scale = np.linalg.norm(d) / np.linalg.norm(d0)
  c = -(G @ d)
  eta = 2.0 ** s * lr if same else lr
  min_eta = 0.5 ** s * lr / scale
  old_cos = (l @ u) / l.sum()
  tried = []
  accepted = None
  while eta >= min_eta:
    lq = np.array([float(client_loss(flat0 - eta * d, cid)) for cid in cohort])
    tried.append((eta, lq.sum()))
    ok = np.all(l - lq >= eta * beta * c)
    if fair:
      ok = ok and (lq @ u) / np.linalg.norm(lq) - old_cos > 0
    if ok:
      accepted = eta
      break
    eta /= 2
  if accepted is None:
    dec = [e for e, tot in tried if tot < l.sum()]
    accepted = dec[0] if dec else tried[int(np.argmin([t for _, t in tried]))][0]
  ref["last"] = list(zip(cohort, G))
  return unravel(jnp.asarray(flat0 - accepted * d, jnp.float32)), {"fair": fair, "same": same,
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
  ref = {"exp": np.zeros(clients), "count": np.zeros(clients, int), "last": []}
  params = state.server.params
  seen_same = False
  for r in range(3):
    rkey = jax.random.fold_in(jax.random.PRNGKey(0), r)
    cohort, _ = exp.sampler.sample(jax.random.split(rkey, 3)[0], jnp.int32(r), state.sampler)
    cohort = [int(c) for c in np.asarray(cohort)]
    params, info = reference_round(params, ref, cohort, exp.data.train, alg.apply_fn,
                                   lr=cfg.client_lr)
    seen_same |= info["same"] and r > 0
    state, metrics = round_fn(state, exp.data.train)
    assert float(metrics["server/candidates"][0]) == info["candidates"]
    assert float(metrics["server/fair_guidance"][0]) == float(info["fair"])
    for a, b in zip(jax.tree.leaves(state.server.params), jax.tree.leaves(params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state.server.expected_loss), ref["exp"], rtol=1e-5)
  assert seen_same == (clients == per_round)


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
