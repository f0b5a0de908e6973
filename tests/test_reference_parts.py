"""Reference tests for parts that were only checked to run (or only at M = 1).

* Multi-model losses (``algorithms/losses.py``; FedMuscle arXiv 2602.01626,
  GRAM arXiv 2412.11959): the pairwise InfoNCE and the GRAM volume loss at
  M = 2, 3 against float64 loops over anchors, negatives and tuples.
* FedMuscle's round (``algorithms/fedmuscle.py``): inside real rounds
  (``make_round``, client fine-tuning at lr 0 so that round 1 changes a model
  only through alignment), the alignment equals T SGD steps restated here on
  the PREVIOUS round's public batch against the other users' stored matrices,
  moves encoder + projection and leaves the task head bit-for-bit; crafted
  server states show a user never counts itself, nor a stale upload, among its
  M partners.
* CoRe-Fed's client side (``algorithms/corefed.py``, arXiv 2602.00647): three
  real rounds on a fixed cohort schedule with full-batch local training (so a
  client's update does not depend on its key); every stored update equals
  local training on a loss restated here from the previous round's server
  state (z_g of round t-1, NT-Xent negatives = the other clients' uploads of
  round t-1), and round 0 trains on cross-entropy alone.
* SSD (``algorithms/ssd.py``, arXiv 2508.01251): the same cohort in different
  slot orders gives the same round, and the round equals one restated here
  with each client's DSR block taken by its client id (not by its slot).
* ``metrics.l2_normalize`` has a finite gradient at a zero row (it was NaN; the
  SSD test above runs into such rows: padded examples, no augmentation noise).

No expectation depends on a random draw: the recomputations start from the
round's own inputs and outputs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.algorithms import losses
from fedjax_sim.metrics import l2_normalize

# ----------------------------------------------------------------------------- losses, M > 1


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _np_pairwise_info_nce(anchor, others, tau):
  """sum_m 1/B sum_i -log(e^{a_i.o^m_i/tau} / sum_j e^{a_i.o^m_j/tau}), one (i, j) at a time."""
  a, o = np.float64(anchor), np.float64(others)
  m_count, b = o.shape[:2]
  total = 0.0
  for m in range(m_count):
    per_anchor = 0.0
    for i in range(b):
      den = sum(np.exp(a[i] @ o[m, j] / tau) for j in range(b))
      per_anchor += -np.log(np.exp(a[i] @ o[m, i] / tau) / den)
    total += per_anchor / b
  return total


def _np_volume(vectors):
  """k-volume spanned by the rows of [k, D]: prod |diag(R)| of a QR of the transpose (float64).

  Independent of the Gram determinant the code uses.
  """
  r = np.linalg.qr(np.float64(vectors).T, mode="r")
  return float(np.prod(np.abs(np.diag(r))))


def _np_gram_volume_loss(anchor, others, tau):
  """GRAM: vol[i, j] = Volume(a_i, o^1_j, .., o^M_j); symmetric cross-entropy of -vol/tau."""
  a, o = np.float64(anchor), np.float64(others)
  m_count, b = o.shape[:2]
  logits = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      logits[i, j] = -_np_volume(np.stack([a[i]] + [o[m, j] for m in range(m_count)])) / tau
  a2t = np.mean([-(logits[i, i] - np.log(np.sum(np.exp(logits[i])))) for i in range(b)])
  t2a = np.mean([-(logits[j, j] - np.log(np.sum(np.exp(logits[:, j])))) for j in range(b)])
  return 0.5 * (a2t + t2a)


@pytest.mark.parametrize("m_count,b,d", [(2, 5, 6), (3, 4, 6)])
def test_pairwise_info_nce_at_m_above_one_matches_loops(m_count, b, d):
  rng = np.random.default_rng(20 + m_count)
  a, o = _unit(rng, b, d), _unit(rng, m_count, b, d)
  want = _np_pairwise_info_nce(a, o, 0.2)
  np.testing.assert_allclose(losses.pairwise_info_nce(a, o, 0.2), want, rtol=2e-5)
  # Each of the M terms counts: dropping the last other model changes the sum.
  assert abs(want - _np_pairwise_info_nce(a, o[:-1], 0.2)) > 1e-2


@pytest.mark.parametrize("m_count,b,d", [(2, 5, 6), (3, 4, 6)])
def test_gram_volume_loss_at_m_above_one_matches_loops(m_count, b, d):
  rng = np.random.default_rng(30 + m_count)
  a, o = _unit(rng, b, d), _unit(rng, m_count, b, d)
  want = _np_gram_volume_loss(a, o, 0.2)
  np.testing.assert_allclose(losses.gram_volume_loss(a, o, 0.2), want, rtol=2e-5)
  # The volume is that of all M + 1 vectors (sqrt of the Gram determinant).
  vecs = np.stack([a[0]] + [o[m, 1] for m in range(m_count)])
  np.testing.assert_allclose(losses.gram_volume(jnp.asarray(vecs)), _np_volume(vecs), rtol=1e-4)
  # Both directions count: the anchor -> tuple direction alone differs.
  logits = -np.array([[_np_volume(np.stack([a[i]] + [o[m, j] for m in range(m_count)]))
                       for j in range(b)] for i in range(b)]) / 0.2
  a2t = np.mean([np.log(np.sum(np.exp(logits[i]))) - logits[i, i] for i in range(b)])
  assert abs(a2t - want) > 1e-4


def test_l2_normalize_is_finite_at_zero_rows_and_unchanged_elsewhere():
  """A zero row (a padded example through bias-free layers at init) is normalized to 0 with a
  zero gradient when its cotangent is 0, not NaN (a NaN there made SSD's and FedAlignUniform's
  round NaN with noise-free augmentations); other rows are z / ||z||."""
  rng = np.random.default_rng(5)
  z = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32).at[2].set(0.0)
  mask = jnp.asarray(np.arange(6) != 2)
  out = jax.jit(l2_normalize)(z)
  ref = z / np.linalg.norm(np.float64(z), axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out)[np.asarray(mask)], ref[np.asarray(mask)], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out[2]), 0.0)
  g = jax.grad(lambda z: jnp.sum(jnp.where(mask[:, None], l2_normalize(z), 0.0) ** 3))(z)
  assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g[2]) == 0.0)


# ----------------------------------------------------------------------------- FedMuscle

MUSCLE_USERS, MUSCLE_PUBLIC, MUSCLE_B, MUSCLE_T, MUSCLE_LR = 4, 20, 4, 2, 0.1
TAU_N, TAU_N1 = 0.2, 0.15


@pytest.fixture(scope="module")
def muscle():
  """The test suite's smallest FedMuscle setup (2 pools, 4 users, 20 public digits, B = 4) with
  M = C - 1 = 3 and client fine-tuning at lr 0: after round 0 a model changes only by alignment.

  Returns a dict: fm (the module), data, alg, round_fn, the states ``s[0]`` (init), ``s[1]``
  (after round 0) and ``s2[method]`` (after round 1 with that alignment loss; one compiled
  program for all methods), metrics ``m1``, ``m2[method]``, and ``um[p]``, pool p's user model.
  """
  from fedjax_sim.algorithms import fedmuscle as fm
  from fedjax_sim.round import init_state, make_mesh, make_round
  from fedjax_sim.data import build_multitask_digits
  d = build_multitask_digits(num_clients=MUSCLE_USERS, examples_per_user=10, public_per_class=2,
                             seed=0)
  assert d.aux["public_x"].shape[0] == MUSCLE_PUBLIC
  alg = fm.fedmuscle(("mlp_s", "mlp_m"), d.aux["tasks"], d.aux["public_x"],
                     input_shape=d.input_shape, task_classes=d.aux["task_classes"],
                     M=MUSCLE_USERS - 1, tau_n=TAU_N, tau_n1=TAU_N1, public_batch=MUSCLE_B,
                     proj_dim=4, align_steps=MUSCLE_T, align_lr=MUSCLE_LR, client_lr=0.0,
                     client_momentum=0.9, batch_size=10)
  mesh = make_mesh(1)
  round_fn = make_round(alg, seed=0, mesh=mesh, donate=False)
  s0 = fm.with_tasks(init_state(alg, None, MUSCLE_USERS, seed=0, mesh=mesh), alg,
                     d.aux["tasks"])
  s1, m1 = round_fn(s0, d.train)
  s2, m2 = {}, {}
  for method in ("muscle", "pairwise", "gram"):
    s2[method], m2[method] = round_fn(fm.set_method(s1, method), d.train)
  ums = [fm.user_model(pool.name, d.input_shape, 4) for pool in alg.pools]
  return dict(fm=fm, data=d, alg=alg, um=ums, round_fn=round_fn, s=(s0, s1), m1=m1, s2=s2,
              m2=m2)


def _user_params(state, alg, user):
  """(pool index, params of global user ``user``) from a SimState."""
  for p, pool in enumerate(alg.pools):
    local = np.flatnonzero(np.asarray(pool.client_ids) == user)
    if local.size:
      return p, jax.tree.map(lambda a: a[int(local[0])], state.clients[p].params)
  raise KeyError(user)


_MUSCLE_LOSSES = {
    "muscle": lambda z, o: losses.muscle_loss(z, o, TAU_N, TAU_N1),
    "pairwise": lambda z, o: losses.pairwise_info_nce(z, o, TAU_N),
    "gram": lambda z, o: losses.gram_volume_loss(z, o, TAU_N),
}


_RESTATED = {}


def _restated_alignment(um, params, x_pub, others, method):
  """T plain-SGD steps of the alignment loss on encoder + proj; the head is not touched.

  ``um``: the user's :class:`UserModel`; x_pub float32 [B, 8, 8, 1]; others float32 [M, B, d].
  One compiled function per (model, method).
  """
  if (um, method) not in _RESTATED:
    loss = _MUSCLE_LOSSES[method]
    rep = ("encoder", "proj")

    @jax.jit
    def run(params, x_pub, others):
      for _ in range(MUSCLE_T):
        g = jax.grad(lambda q: loss(l2_normalize(um.represent({**params, **q}, x_pub)),
                                    others))({k: params[k] for k in rep})
        params = {**params, **{k: jax.tree.map(lambda a, b: a - MUSCLE_LR * b, params[k], g[k])
                               for k in rep}}
      return params

    _RESTATED[(um, method)] = run
  return _RESTATED[(um, method)](params, jnp.asarray(x_pub), jnp.asarray(others))


def _public_batch(muscle, server, round_):
  fm = muscle["fm"]
  idx = fm.public_batch_indices(server.key, jnp.int32(round_), MUSCLE_PUBLIC, MUSCLE_B)
  return np.asarray(muscle["data"].aux["public_x"])[np.asarray(idx)]


def _close(a, b, rtol=1e-4, atol=1e-5):
  return all(np.allclose(x, y, rtol=rtol, atol=atol)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("method", ["muscle", "pairwise", "gram"])
def test_fedmuscle_round_aligns_on_previous_batch_against_others_and_freezes_head(muscle, method):
  """Round 1 of a real run, every user: the model equals T SGD steps restated here on
  round 0's public batch against the M = C - 1 OTHER users' round-0 matrices; the head is
  bit-for-bit the head before alignment; the upload is this round's batch at that model."""
  alg = muscle["alg"]
  s0, s1 = muscle["s"]
  s2 = muscle["s2"][method]
  np.testing.assert_array_equal(muscle["m1"]["aligned"], [0.0])  # round 0: nothing to align to
  np.testing.assert_array_equal(muscle["m2"][method]["aligned"], [1.0])
  x_prev, x_cur = _public_batch(muscle, s1.server, 0), _public_batch(muscle, s1.server, 1)
  assert not np.array_equal(x_prev, x_cur)
  reps1 = np.asarray(s1.server.reps)
  # float32 Gram determinants: the restated GRAM steps agree to ~1e-4 (alternatives: > 0.1).
  atol = 1e-3 if method == "gram" else 1e-5
  np.testing.assert_array_equal(np.asarray(s1.server.rep_round), [0] * MUSCLE_USERS)
  for n in range(MUSCLE_USERS):
    p, before = _user_params(s1, alg, n)
    _, after = _user_params(s2, alg, n)
    um = muscle["um"][p]
    # Round 0's upload: this user's matrix of round 0's batch (fine-tuning at lr 0 kept init).
    assert _close(before, _user_params(s0, alg, n)[1], rtol=0, atol=0)
    np.testing.assert_allclose(reps1[n], l2_normalize(um.represent(before, x_prev)),
                               rtol=1e-5, atol=1e-6)
    others = reps1[[m for m in range(MUSCLE_USERS) if m != n]]
    want = _restated_alignment(um, before, x_prev, others, method)
    assert _close(after, want, atol=atol), (n, _max_diff(after, want))
    # The head is frozen, the representation model moved.
    jax.tree.map(np.testing.assert_array_equal, after["head"], before["head"])
    assert _max_diff(after["proj"], before["proj"]) > 1e-3
    assert _max_diff(after["encoder"], before["encoder"]) > 1e-4
    # The round-1 upload is round 1's batch at the aligned model.
    np.testing.assert_allclose(np.asarray(s2.server.reps[n]),
                               l2_normalize(um.represent(after, x_cur)),
                               rtol=1e-5, atol=1e-6)
    # The check can tell: this round's batch, or the user's own matrix among the
    # partners, give other models.
    assert not _close(after, _restated_alignment(um, before, x_cur, others, method), atol=atol)
    with_self = reps1[[n] + [m for m in range(MUSCLE_USERS) if m != n][1:]]
    assert not _close(after, _restated_alignment(um, before, x_prev, with_self, method),
                      atol=atol)


def test_fedmuscle_partners_exclude_self_and_stale_uploads(muscle):
  """Round 2 of a real run from crafted upload rounds (M = 3 of C = 4): with the matrices of
  users 0-2 from round 1 and none from user 3, only user 3 has M partners (each of users 0-2
  would need to count itself) and it aligns with {0, 1, 2}; with user 0 silent and user 3's
  matrix from round 0, nobody aligns (a stale upload is no partner)."""
  alg = muscle["alg"]
  s2 = muscle["s2"]["muscle"]
  assert int(s2.round) == 2 and int(s2.server.round) == 2
  x_prev = _public_batch(muscle, s2.server, 1)
  reps = np.asarray(s2.server.reps)
  sizes = np.asarray(muscle["data"].train.num_examples, np.float64)

  def run(rep_round):
    old = s2.server.rep_round
    srv = s2.server._replace(rep_round=jax.device_put(jnp.asarray(rep_round, jnp.int32),
                                                      old.sharding))
    return muscle["round_fn"](s2._replace(server=srv), muscle["data"].train)

  s3, m3 = run([1, 1, 1, -1])
  np.testing.assert_allclose(m3["aligned"], [sizes[3] / sizes.sum()], rtol=1e-6)
  for n in range(3):
    assert _close(_user_params(s3, alg, n)[1], _user_params(s2, alg, n)[1], rtol=0, atol=0), n
  p, before = _user_params(s2, alg, 3)
  want = _restated_alignment(muscle["um"][p], before, x_prev, reps[[0, 1, 2]], "muscle")
  after = _user_params(s3, alg, 3)[1]
  assert _close(after, want), _max_diff(after, want)

  s3, m3 = run([-1, 1, 1, 0])
  np.testing.assert_array_equal(m3["aligned"], [0.0])
  for n in range(MUSCLE_USERS):
    assert _close(_user_params(s3, alg, n)[1], _user_params(s2, alg, n)[1], rtol=0, atol=0), n


# ----------------------------------------------------------------------------- CoRe-Fed

CF_C, CF_F, CF_D, CF_L, CF_N = 6, 5, 4, 3, 8
CF_LR, CF_EPOCHS, CF_TAU, CF_BETA = 0.3, 3, 0.07, 0.5
# A fixed cohort schedule (no random draw): round 2 holds client 4 (also in round 1, so its
# own round-1 upload must not be a negative) and client 0 (whose round-0 upload is stale).
CF_COHORTS = ((0, 1, 2), (2, 3, 4), (4, 5, 0))


def _cf_model():
  """A two-layer tanh net: z = tanh(x W1 + b1) [B, D], logits = z W2 + b2 [B, L]."""
  def init_params(rng):
    k1, k2 = jax.random.split(rng)
    return {"w1": jax.random.normal(k1, (CF_F, CF_D)), "b1": jnp.zeros((CF_D,)),
            "w2": jax.random.normal(k2, (CF_D, CF_L)), "b2": jnp.zeros((CF_L,))}

  def embed_fn(p, x):
    z = jnp.tanh(x @ p["w1"] + p["b1"])
    return z @ p["w2"] + p["b2"], z

  return init_params, embed_fn


def _restated_corefed_step(embed_fn):
  """Local training (full batch, CF_EPOCHS steps of SGD at CF_LR) on the loss restated:

  CE (+ if ``on``: NT-Xent(zb, z_g; negatives) + ||zb - sg(zb + beta (rho z_g - zb))||^2), with
  zb = normalize(mean embedding of the batch's real rows), rho = zb . z_g, negatives the rows
  of ``negs`` [C, D] where ``neg_on`` [C] (built by the caller from the cohort schedule).
  Returns ``(params, data, z_g, negs, neg_on, on) -> delta = params - trained``.
  """
  from fedjax_sim.protocol import local_train
  unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)

  def loss(p, x, y, m, z_g, negs, neg_on, on):
    logits, z = embed_fn(p, x)
    mf = m.astype(jnp.float32)
    ce = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y) * mf) / jnp.sum(mf)
    if not on:
      return ce
    zb = unit(jnp.sum(z * mf[:, None], 0) / jnp.sum(mf))
    zg = unit(z_g)
    pos = zb @ zg / CF_TAU
    negs = jnp.where(neg_on[:, None], negs, 1.0)  # rows never uploaded are 0: keep them finite
    neg = jnp.where(neg_on, unit(negs) @ zb / CF_TAU, -jnp.inf)
    nt_xent = jnp.log(jnp.exp(pos) + jnp.sum(jnp.exp(neg))) - pos
    zs = jax.lax.stop_gradient(zb)
    target = jax.lax.stop_gradient(zs + CF_BETA * ((zs @ zg) * zg - zs))
    return ce + nt_xent + jnp.sum((zb - target) ** 2)

  @functools.partial(jax.jit, static_argnums=5)
  def step(params, data, z_g, negs, neg_on, on):
    res = local_train(lambda p, x, y, m, r: loss(p, x, y, m, z_g, negs, neg_on, on), params,
                      optax.sgd(CF_LR), data, jax.random.PRNGKey(0), epochs=CF_EPOCHS,
                      batch_size=CF_N)
    return jax.tree.map(lambda a, b: a - b, params, res.params)

  return step


def test_corefed_client_loss_uses_round_t_minus_1_embeddings_and_skips_round_0():
  """Three real CoRe-Fed rounds (all mechanisms on) on a fixed cohort schedule. Every client's
  one-batch-per-epoch training makes its update independent of its key, so each stored
  update Delta_i of round t can be recomputed: it equals local training on CE alone in round
  0 (no z_g yet), and from round 1 on CE + NT-Xent + distillation with z_g and the negatives
  taken from the state after round t-1 (negatives: the OTHER clients of round t-1's cohort).
  The logged align/distill losses are those terms at the uploaded z_i, restated in NumPy."""
  from fedjax_sim.algorithms import corefed as cf
  from fedjax_sim.client_data import pack
  from fedjax_sim.round import init_state, make_mesh, make_round
  from fedjax_sim.sampling import Sampler
  init_params, embed_fn = _cf_model()
  alg = cf.corefed(lambda p, x: embed_fn(p, x)[0], init_params, embed_fn, num_clients=CF_C,
                   embed_dim=CF_D, clients_per_round=3, client_lr=CF_LR, batch_size=CF_N,
                   epochs=CF_EPOCHS, tau_c=CF_TAU, beta=CF_BETA)
  rng = np.random.default_rng(0)
  sizes = [5, 7, 4, 6, 8, 3]
  data = jax.tree.map(jnp.asarray, pack(
      [rng.normal(size=(n, CF_F)).astype(np.float32) for n in sizes],
      [rng.integers(0, CF_L, n).astype(np.int32) for n in sizes], CF_N))
  assert data.y.shape == (CF_C, CF_N)  # every client's data is one batch
  table = jnp.asarray(CF_COHORTS, jnp.int32)
  sampler = Sampler(lambda: (), lambda key, r, st: (table[r % len(CF_COHORTS)], st), CF_C, 3)
  mesh = make_mesh(1)
  round_fn = make_round(alg, sampler, seed=0, mesh=mesh, donate=False)
  states, logged = [init_state(alg, sampler, CF_C, seed=0, mesh=mesh)], []
  for _ in CF_COHORTS:
    st, m = round_fn(states[-1], data)
    states.append(st)
    logged.append(m)
  step = _restated_corefed_step(embed_fn)
  client = lambda i: jax.tree.map(lambda a: a[i], data)
  z_all = [np.float64(np.asarray(s.server.client_z)) for s in states]
  for t, cohort in enumerate(CF_COHORTS):
    before, after = states[t].server, states[t + 1].server
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(after.last_round) == t),
                                  sorted(cohort))
    # z_g of round t: normalize(mean of this round's uploads).
    z_up = z_all[t + 1][list(cohort)]
    zg = np.mean(z_up, 0) / np.linalg.norm(np.mean(z_up, 0))
    np.testing.assert_allclose(np.asarray(after.z_global), zg, rtol=1e-5, atol=1e-6)
    assert bool(before.has_global) == (t > 0)
    zg_prev = np.float64(np.asarray(before.z_global))
    align, distill = [], []
    for i in cohort:
      negs = [j for j in (CF_COHORTS[t - 1] if t else ()) if j != i]
      neg_on = np.isin(np.arange(CF_C), negs)
      want = step(before.params, client(i), before.z_global, before.client_z, neg_on,
                  t > 0)
      got = jax.tree.map(lambda a: a[i], after.stored_update)
      assert _close(got, want, rtol=1e-4, atol=1e-6), (t, i, _max_diff(got, want))
      if t == 1 and i == 4:  # the check can tell: this round's uploads as negatives, or no terms
        wrong = np.isin(np.arange(CF_C), [j for j in CF_COHORTS[1] if j != i])
        for alt in (step(before.params, client(i), before.z_global, after.client_z, wrong,
                         True),
                    step(before.params, client(i), before.z_global, before.client_z, neg_on,
                         False)):
          assert not _close(got, alt, rtol=1e-4, atol=1e-6)
      # The logged terms at the uploaded z_i (NumPy, one negative at a time).
      z = z_all[t + 1][i]
      if t:
        pos = np.exp(z @ zg_prev / CF_TAU)
        den = pos + sum(np.exp(z @ z_all[t][j] / CF_TAU) for j in negs)
        align.append(-np.log(pos / den))
        distill.append(np.sum((CF_BETA * ((z @ zg_prev) * zg_prev - z)) ** 2))
      else:
        align.append(0.0)
        distill.append(0.0)
    w = np.asarray([sizes[i] for i in cohort], np.float64)
    np.testing.assert_allclose(logged[t]["align_loss"], [np.dot(w, align) / w.sum()], rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(logged[t]["distill_loss"], [np.dot(w, distill) / w.sum()],
                               rtol=1e-4, atol=1e-7)
  assert float(logged[0]["align_loss"][0]) == 0.0 and float(logged[1]["align_loss"][0]) > 0


# ----------------------------------------------------------------------------- SSD


def test_ssd_dsr_block_follows_client_id_not_cohort_slot():
  """Real SSD rounds (C = 4, D = 16, b = 4) on one cohort {0, 1, 3} in three slot orders (the
  order lives in the sampler state; no size sorting) give the same server model, and it equals
  a restated round: FedAvg of each client's local training on ``ssd_loss`` with the DSR block
  Q[:, 4k : 4k + 4] of its CLIENT ID k (sliced here from ``dsr_basis``), not the block of its
  slot (the official code's rule). Identity augmentations and one batch per epoch make a
  client's update independent of its key, so the round can be recomputed outside it. (Padded
  rows then reach the loss as exact zeros: the round was NaN before ``l2_normalize``'s fix.)"""
  from fedjax_sim.protocol import local_train, tree_weighted_mean
  from fedjax_sim.algorithms.ssd import dsr_basis, ssd, ssd_loss
  from fedjax_sim.algorithms.ssl import SSLModel
  from fedjax_sim.augment import AugmentConfig
  from fedjax_sim.client_data import pack
  from fedjax_sim.round import init_state, make_mesh, make_round
  from fedjax_sim.sampling import Sampler
  model = SSLModel(dim=16, encoder_hidden=(16,), projector_hidden=16)
  c, b, batch, lr, epochs = 4, 4, 8, 0.05, 2
  rng = np.random.default_rng(0)
  sizes = [6, 3, 8, 5]
  data = jax.tree.map(jnp.asarray, pack(
      [rng.uniform(size=(n, 8, 8, 1)).astype(np.float32) for n in sizes],
      [np.zeros(n, np.int32) for n in sizes], batch))
  assert data.y.shape == (c, batch)  # every client's data is one batch
  identity = AugmentConfig(max_rotation_deg=0.0, scale_range=(1.0, 1.0), max_shift=0.0,
                           intensity_range=(1.0, 1.0), noise_std=0.0)
  alg = ssd(model, (8, 8, 1), num_clients=c, rounds=2, client_lr=lr, momentum=0.0,
            weight_decay=0.0, cosine=False, batch_size=batch, epochs=epochs, augment=identity)
  sampler = Sampler(lambda: jnp.asarray([3, 1, 0], jnp.int32), lambda key, r, st: (st, st), c, 3)
  mesh = make_mesh(1)
  round_fn = make_round(alg, sampler, seed=0, mesh=mesh, sort_by_size=False, donate=False)
  st0 = init_state(alg, sampler, c, seed=0, mesh=mesh)

  def run(order):
    st = st0._replace(sampler=jax.device_put(jnp.asarray(order, jnp.int32), st0.sampler.sharding))
    return round_fn(st, data)[0].server.params

  got = run([3, 1, 0])
  for order in ([0, 3, 1], [1, 0, 3]):
    other = run(order)
    assert _close(other, got, rtol=1e-5, atol=1e-6), (order, _max_diff(other, got))

  q_np = dsr_basis(16, 0)

  @jax.jit
  def delta(params, one, block):
    q = jnp.take(jnp.asarray(q_np), block * b + jnp.arange(b), axis=1)

    def loss(p, x, y, m, r):  # identity views: both views are x
      h, z = model.apply({"params": p}, x)
      return ssd_loss(h, h, z, z, m, q, beta=1.0, gamma=1.0, delta=0.1)

    res = local_train(loss, params, optax.sgd(lr), one, jax.random.PRNGKey(0), epochs=epochs,
                      batch_size=batch)
    return jax.tree.map(lambda a, r: a - r, params, res.params)

  def restated(block_of):
    params = st0.server.params
    ids = [3, 1, 0]
    deltas = [delta(params, jax.tree.map(lambda a: a[i], data), block_of[i]) for i in ids]
    mean = tree_weighted_mean(jax.tree.map(lambda *d: jnp.stack(d), *deltas),
                              jnp.asarray([sizes[i] for i in ids], jnp.float32))
    return jax.tree.map(lambda p, d: p - d, params, mean)

  by_id = restated({0: 0, 1: 1, 3: 3})
  assert _close(got, by_id, rtol=1e-4, atol=1e-6), _max_diff(got, by_id)
  by_slot = restated({3: 0, 1: 1, 0: 2})  # slots of the order [3, 1, 0]
  assert _max_diff(got, by_slot) > 1e-3, _max_diff(got, by_slot)
