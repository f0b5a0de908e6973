"""Reference tests of the model-pool methods: each update against a NumPy statement of it.

* FedRE's server head training (:func:`fedjax_sim.algorithms.rm.train_head`,
  arXiv 2511.22265; the official ``serverre.py`` loop): plain SGD of the linear
  head on soft-label cross-entropy over the VALID (representation, soft label)
  pairs, ceil(M_valid / B) batches per epoch with a partial last one, loss
  summed over the batch (``sum``) or averaged over its rows (``mean``);
  restated in float64 with the softmax gradient written by hand.
* FedGH (Yi et al., arXiv 2303.13137, Alg. 1), FedAllRep and LG-FedAvg (Liang
  et al., arXiv 2001.01523) (``algorithms/fedgh.py``, ``fedallrep.py``, ``lg_fedavg.py``):
  the client's head replacement and upload (class means of its features on
  real rows / all its real (feature, label) pairs / its trained head), the
  server update from given uploads, weights and valid mask, and one real
  round (``make_round``) recomputed from the clients' trained models.
* CODIST MERGED with alpha > 0 (arXiv 2310.02549,
  :mod:`fedjax_sim.algorithms.codist`): the server optimizer's input is
  (1 - alpha) Delta_FedAvg + alpha (theta - D(theta)), pseudo-gradients of the
  form w_old - w_new; checked by value (NumPy Adam) and by direction (with
  SGD(1) the new model is (1 - alpha) * FedAvg mean + alpha * distilled).
  alpha = 0 is tests/test_codist.py's; D itself (``codistill``) is checked
  against optax there too.

One detail comes from the code, not a paper: train_head's epoch order (valid
rows sorted by ``uniform(fold_in(rng, epoch))``), restated once in
:func:`_orders`, since SGD over several batches depends on the order; the
FedGH/FedAllRep server updates pass row ids (pool, client, row), whose order
:func:`_orders_by_id` restates. The full-batch cases need no order at all.

Axis legend: K cohort, N examples, M pairs, B batch, D common dim, L classes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.protocol import ClientInfo, ServerInfo
from fedjax_sim.algorithms import codist as codist_lib
from fedjax_sim.algorithms import fedallrep, fedgh, fedproto, lg_fedavg
from fedjax_sim.algorithms import rm as rm_lib
from fedjax_sim.algorithms.pooled import DataSpec, zoo_functions
from conftest import random_image_clients
from fedjax_sim.client_data import ClientData
from fedjax_sim.round import init_state, make_mesh, make_round

L, D = 4, 3


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# NumPy statement of the server's head training.


def _np_log_softmax(a):
  a = a - a.max(-1, keepdims=True)
  return a - np.log(np.exp(a).sum(-1, keepdims=True))


def np_train_head(head, reps, targets, orders, *, lr, batch_size, reduction):
  """The official loop in float64: per epoch, the valid rows in ``orders[e]`` (indices into
  reps float [M, D] / targets float [M, L]) in batches of B, the last one partial.

  Batch loss sum_i CE_i (``sum``) or its mean over the batch's rows (``mean``), CE_i =
  -sum_c t_ic log softmax(z_i W + b)_c; d CE_i / d logits_i = softmax_i * sum_c t_ic - t_i.

  Returns:
    (kernel [D, L], bias [L], mean CE per visited row over all epochs).
  """
  w = np.asarray(head["kernel"], np.float64)
  b = np.asarray(head["bias"], np.float64)
  z_all, t_all = np.asarray(reps, np.float64), np.asarray(targets, np.float64)
  total, rows = 0.0, 0
  for order in orders:
    for s in range(0, len(order), batch_size):
      idx = order[s:s + batch_size]
      z, t = z_all[idx], t_all[idx]
      logp = _np_log_softmax(z @ w + b)
      total, rows = total - np.sum(t * logp), rows + len(idx)
      g = np.exp(logp) * t.sum(-1, keepdims=True) - t  # [B, L]
      if reduction == "mean":
        g = g / len(idx)
      w, b = w - lr * z.T @ g, b - lr * g.sum(0)
  return w, b, total / max(rows, 1)


def _orders(rng, valid, batch_size, epochs):
  """Each epoch's visiting order of the valid rows as train_head draws it: scores
  ``uniform(fold_in(rng, e))`` over the M rows padded to a multiple of B; valid rows by score."""
  m = len(valid)
  scores_len = -(-m // batch_size) * batch_size
  vidx = np.flatnonzero(valid)
  return [vidx[np.argsort(np.asarray(jax.random.uniform(jax.random.fold_in(rng, e),
                                                        (scores_len,)))[vidx], kind="stable")]
          for e in range(epochs)]


def _orders_by_id(rng, valid, row_ids, epochs):
  """The same with ``row_ids`` (int [M]): valid rows by ``bits(fold_in(fold_in(rng, e),
  id))`` (uint32), ties by id, whatever their positions."""
  vidx = np.flatnonzero(valid)
  ids = np.asarray(row_ids)[vidx]
  bits = lambda e: [int(jax.random.bits(jax.random.fold_in(jax.random.fold_in(rng, e), int(i)),
                                        (), jnp.uint32)) for i in ids]
  return [vidx[np.lexsort((ids, bits(e)))] for e in range(epochs)]


def _pairs(m, n_invalid, seed=0):
  """M soft-label pairs, ``n_invalid`` of them invalid and filled with garbage."""
  rng = np.random.default_rng(seed)
  reps = rng.normal(size=(m, D)).astype(np.float32)
  targets = rng.dirichlet(np.full(L, 0.7), size=m).astype(np.float32)
  valid = np.ones(m, bool)
  bad = rng.choice(m, n_invalid, replace=False)
  valid[bad] = False
  reps[bad] = 1e3  # would dominate the head if an invalid row ever entered a gradient
  targets[bad[::2]] = 0.0  # an empty FedRE upload has an all-zero label
  return reps, targets, valid


# (M, invalid, B, epochs, shuffled): M = 14 with 5 invalid and B = 4 visits the 9 valid rows as
# 4 + 4 + 1 (partial) and then a batch of invalid/padding rows only (zero gradient); the second
# case is one full batch per epoch (gradient descent, order-free).
HEAD_CASES = {"partial_batches": (14, 5, 4, 2, True), "full_batch": (10, 3, 16, 3, False)}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_train_head_equals_numpy_sgd(case, reduction):
  m, n_invalid, bs, epochs, shuffled = HEAD_CASES[case]
  reps, targets, valid = _pairs(m, n_invalid)
  head = rm_lib.init_head(jax.random.PRNGKey(1), D, L)
  key = jax.random.PRNGKey(7)
  lr = 0.1 if reduction == "sum" else 0.3
  got, loss = jax.jit(lambda h, r, t, v, k: rm_lib.train_head(
      h, r, t, v, k, lr=lr, batch_size=bs, epochs=epochs, reduction=reduction))(
          head, reps, targets, valid, key)
  orders = (_orders(key, valid, bs, epochs) if shuffled
            else [np.flatnonzero(valid)] * epochs)
  w, b, want_loss = np_train_head(head, reps, targets, orders, lr=lr, batch_size=bs,
                                  reduction=reduction)
  np.testing.assert_allclose(got["kernel"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["bias"], b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert np.abs(w - np.asarray(head["kernel"])).max() > 0.05  # the head did move


def test_train_head_without_valid_rows_keeps_the_head():
  reps, targets, _ = _pairs(6, 0)
  head = rm_lib.init_head(jax.random.PRNGKey(1), D, L)
  got, loss = rm_lib.train_head(head, reps, targets, np.zeros(6, bool), jax.random.PRNGKey(0),
                                lr=0.1, batch_size=4, epochs=2)
  _assert_equal(got, head)
  assert float(loss) == 0.0


# ---------------------------------------------------------------------------------------------
# FedGH, FedAllRep, LG-FedAvg.

ARCHS = ("mlp_s", "mlp_m")
DATA_SPEC = DataSpec((8, 8, 1), L, 7)  # pools of 4 and 3 clients; K = 5 splits as 3 + 2
KW = dict(batch_size=8, dim=D, rm="avg", epochs=1, local_steps=0, client_momentum=0.0,
          lr_decay=1.0)
BUILD = {"fedgh": fedgh.fedgh, "fedallrep": fedallrep.fedallrep, "lg_fedavg": lg_fedavg.lg_fedavg}
HEAD_METHODS = list(BUILD)


def _build(name, client_lr=0.05, **server_kw):
  return BUILD[name](ARCHS, DATA_SPEC, 5, client_lr=client_lr, **KW, **server_kw)


def _model(arch):
  """The pool's split model, rebuilt (pure functions: same params, same features)."""
  return rm_lib.split_model(arch, DATA_SPEC.input_shape, L, D, "avg")


def _one_client(n=16, n_real=11, seed=0):
  """One client's slice: class 2 occurs in padding rows only (absent); padding rows hold
  garbage features."""
  rng = np.random.default_rng(seed)
  x = rng.random((n, 8, 8, 1)).astype(np.float32)
  x[n_real:] = 50.0
  y = np.array([0, 1, 3, 0, 1, 3, 3, 0, 1, 0, 3, 2, 2, 2, 2, 2], np.int32)[:n]
  return ClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(np.arange(n) < n_real),
                    jnp.int32(n_real))


@pytest.mark.parametrize("name", HEAD_METHODS)
def test_client_replaces_its_head_and_uploads(name):
  data = _one_client()
  model = _model(ARCHS[1])
  own = model.init(jax.random.PRNGKey(1))
  g_head = rm_lib.init_head(jax.random.PRNGKey(2), D, L)  # the broadcast global head
  other = {**own, "head": jax.tree.map(lambda a: a + 5.0, own["head"])}
  info = ClientInfo(jnp.int32(1), jnp.int32(0), jnp.bool_(True))
  rng = jax.random.PRNGKey(3)
  y, m = np.asarray(data.y), np.asarray(data.mask)
  for lr in (0.0, 0.05):
    pool = _build(name, client_lr=lr).pools[1]
    assert pool.name == ARCHS[1]
    run = jax.jit(pool.client_update)
    up, params, _ = run(g_head, own, data, rng, info)
    # The client's own head is replaced: another one gives the same result bit for bit.
    _assert_equal(run(g_head, other, data, rng, info)[:2], (up, params))
    if lr == 0.0:  # no training: own extractor + RM, the global head
      _assert_equal(params, {**own, "head": g_head})
    else:
      assert not np.allclose(params["head"]["kernel"], g_head["kernel"])
    # The upload, restated from the client's model after local training.
    z = np.asarray(model.features(params, data.x), np.float64)
    if name == "fedgh":  # per-class mean representation on real rows (FedGH's LARs)
      counts = np.array([np.sum(m & (y == c)) for c in range(L)])
      assert counts[2] == 0
      protos = np.stack([z[m & (y == c)].mean(0) if counts[c] else np.zeros(D)
                         for c in range(L)])
      np.testing.assert_array_equal(up.counts, counts)
      np.testing.assert_allclose(up.protos, protos, rtol=1e-5, atol=1e-6)
    elif name == "fedallrep":  # every (representation, label) pair, real rows marked
      np.testing.assert_allclose(np.asarray(up.reps)[m], z[m], rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(up.labels, y)
      np.testing.assert_array_equal(up.mask, m)
    else:  # LG-FedAvg: the trained head
      _assert_equal(up, params["head"])


VALID = np.array([True, True, False, True, True])  # pool 0: slots 0-2 (2 is padding); pool 1: 3-4
WEIGHTS = np.array([5.0, 7.0, 9.0, 4.0, 6.0], np.float32)  # padding slot weighted: must not count


def _server_inputs(uploads):
  """Splits stacked [5, ...] uploads into the two pools (3 + 2 slots) with weights and infos."""
  cut = lambda t, s: jax.tree.map(lambda a: jnp.asarray(a[s]), t)
  parts = (slice(0, 3), slice(3, 5))
  infos = tuple(ServerInfo(jnp.int32(0), jnp.arange(s.stop - s.start, dtype=jnp.int32),
                           jnp.asarray(np.where(VALID[s], 6, 0), jnp.int32), jnp.asarray(VALID[s]))
                for s in parts)
  return (tuple(cut(uploads, s) for s in parts), tuple(jnp.asarray(WEIGHTS[s]) for s in parts),
          infos)


# The uploads' (pool, client) ids p * C + i the server derives from _server_inputs' infos.
UPLOAD_IDS = np.array([0, 1, 2, DATA_SPEC.num_clients, DATA_SPEC.num_clients + 1])


def _head_scalars_sent(k):
  return k * (D * L + L)


def test_fedgh_server_trains_the_head_on_present_class_prototypes():
  alg = _build("fedgh", server_lr=0.05, server_batch_size=8, server_epochs=2)
  state = alg.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(5, L, D)).astype(np.float32)
  counts = rng.integers(0, 4, size=(5, L)).astype(np.float32)
  counts[0, 1] = counts[3, 0] = 0.0
  protos[counts == 0] = 40.0  # absent classes: garbage vectors, never trained on
  counts[2], protos[2] = 3.0, 1e3  # padding slot
  key = jax.random.PRNGKey(4)
  new, met = jax.jit(alg.server_update)(state, *_server_inputs(fedproto.ProtoUpload(protos, counts)),
                                        key)
  # The pairs (p_kc, onehot(c)) of real clients k and their present classes c (row k * L + c).
  use = ((counts > 0) & VALID[:, None]).reshape(-1)
  targets = np.tile(np.eye(L), (5, 1))
  row_ids = (UPLOAD_IDS[:, None] * L + np.arange(L)).reshape(-1)
  w, b, loss = np_train_head(state.head, protos.reshape(-1, D), targets,
                             _orders_by_id(key, use, row_ids, 2), lr=0.05, batch_size=8,
                             reduction="sum")
  np.testing.assert_allclose(new.head["kernel"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.head["bias"], b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(met["head_loss"], loss, rtol=1e-5)
  assert float(met["server_pairs"]) == use.sum()
  assert float(met["comm/upload_scalars"]) == use.sum() * (D + 1)
  assert float(met["comm/broadcast_scalars"]) == _head_scalars_sent(VALID.sum())


def test_fedallrep_server_trains_the_head_on_every_real_pair():
  alg = _build("fedallrep", server_lr=0.05, server_batch_size=8, server_epochs=2)
  state = alg.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  n = 6
  reps = rng.normal(size=(5, n, D)).astype(np.float32)
  labels = rng.integers(0, L, size=(5, n)).astype(np.int32)
  mask = np.arange(n)[None] < np.array([6, 4, 5, 2, 3])[:, None]
  reps[~mask] = 40.0  # padding rows: garbage
  reps[2] = 1e3  # padding slot
  key = jax.random.PRNGKey(5)
  new, met = jax.jit(alg.server_update)(
      state, *_server_inputs(fedallrep.AllRepUpload(reps, labels, mask)), key)
  use = (mask & VALID[:, None]).reshape(-1)
  row_ids = (UPLOAD_IDS[:, None] * n + np.arange(n)).reshape(-1)
  w, b, loss = np_train_head(state.head, reps.reshape(-1, D), np.eye(L)[labels.reshape(-1)],
                             _orders_by_id(key, use, row_ids, 2), lr=0.05, batch_size=8,
                             reduction="sum")
  np.testing.assert_allclose(new.head["kernel"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.head["bias"], b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(met["head_loss"], loss, rtol=1e-5)
  assert float(met["server_pairs"]) == use.sum() == 6 + 4 + 2 + 3
  assert float(met["comm/upload_scalars"]) == use.sum() * (D + 1)
  assert float(met["comm/broadcast_scalars"]) == _head_scalars_sent(VALID.sum())


def test_lg_fedavg_server_averages_real_heads_by_examples():
  alg = _build("lg_fedavg")
  state = alg.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(2)
  heads = {"kernel": rng.normal(size=(5, D, L)).astype(np.float32),
           "bias": rng.normal(size=(5, L)).astype(np.float32)}
  heads["kernel"][2] = 1e3  # padding slot
  server = jax.jit(alg.server_update)
  new, met = server(state, *_server_inputs(heads), jax.random.PRNGKey(0))
  w = WEIGHTS * VALID
  want = {k: np.tensordot(w, v.astype(np.float64), 1) / w.sum() for k, v in heads.items()}
  _assert_close(new.head, want)
  assert float(met["comm/upload_scalars"]) == _head_scalars_sent(VALID.sum())
  assert float(met["comm/broadcast_scalars"]) == _head_scalars_sent(VALID.sum())
  # No example in the round: the head stays.
  uploads, weights, infos = _server_inputs(heads)
  zero = tuple(jnp.zeros_like(x) for x in weights)
  _assert_equal(server(state, uploads, zero, infos, jax.random.PRNGKey(0))[0].head, state.head)


def _round_data(num_clients=7, n=16, seed=0):
  return random_image_clients(num_clients, n, L, seed)


@pytest.mark.parametrize("name", HEAD_METHODS)
def test_one_round_equals_numpy_from_the_trained_clients(name):
  """A real round (two pools, a padding slot): the new global head, restated from the sampled
  clients' trained models (server batch >= all pairs: one order-free batch)."""
  data = _round_data()
  server_kw = {} if name == "lg_fedavg" else dict(server_lr=0.05, server_batch_size=128)
  alg = _build(name, **server_kw)
  assert [p.clients_per_round for p in alg.pools] == [3, 2]
  mesh = make_mesh(1)
  state = init_state(alg, None, DATA_SPEC.num_clients, seed=0, mesh=mesh)
  # chunk_size 2: pool 0's cohort of 3 is padded to 4 slots.
  new, met = make_round(alg, seed=0, mesh=mesh, chunk_size=2, donate=False)(state, data)
  y, mask, sizes = np.asarray(data.y), np.asarray(data.mask), np.asarray(data.num_examples)
  feats, labels, heads, n_ex = [], [], [], []
  for p, pool in enumerate(alg.pools):
    model = _model(pool.name)
    before, after = state.clients[p], new.clients[p]
    changed = [i for i in range(len(pool.client_ids))
               if any(np.any(np.asarray(a[i]) != np.asarray(b[i]))
                      for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))]
    assert len(changed) == pool.clients_per_round  # the sampled clients, nobody else
    for i in changed:
      g = int(pool.client_ids[i])
      params = jax.tree.map(lambda a: a[i], after)
      feats.append(np.asarray(model.features(params, data.x[g]), np.float64)[mask[g]])
      labels.append(y[g][mask[g]])
      heads.append(params["head"])
      n_ex.append(float(sizes[g]))
  h0 = state.server.head
  if name == "lg_fedavg":
    n_ex = np.array(n_ex)
    want = {k: sum(n * np.asarray(h[k], np.float64) for n, h in zip(n_ex, heads)) / n_ex.sum()
            for k in h0}
    _assert_close(new.server.head, want)
    return
  if name == "fedgh":
    reps = np.concatenate([[z[lab == c].mean(0) for c in range(L) if np.any(lab == c)]
                           for z, lab in zip(feats, labels)])
    targets = np.concatenate([np.eye(L)[np.unique(lab)] for lab in labels])
  else:
    reps, targets = np.concatenate(feats), np.eye(L)[np.concatenate(labels)]
  w, b, loss = np_train_head(h0, reps, targets, [np.arange(len(reps))], lr=0.05,
                             batch_size=128, reduction="sum")
  np.testing.assert_allclose(new.server.head["kernel"], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.server.head["bias"], b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(met["server/head_loss"][0], loss, rtol=1e-5)
  assert float(met["server/server_pairs"][0]) == len(reps)


# ---------------------------------------------------------------------------------------------
# CODIST MERGED, alpha > 0.

CODIST_DATA = DataSpec((4, 4, 1), 3, 5)
DISTILL = dict(steps=2, lr=0.05, temperature=2.0)
ADAM = dict(learning_rate=3e-3, b1=0.9, b2=0.99, eps=1e-3)


@functools.lru_cache(maxsize=None)
def _codist(opt_name):
  """CODIST (mlp_s / mlp_m) with its server inputs: pseudo-gradient uploads (K_p = 3 with a
  padding slot of weight 0, and 2), example weights, infos. The distillation batch covers
  the whole server set, so no key enters D. Cached per server optimizer (sgd1 | adam):
  one compiled server update per optimizer."""
  server_opt = optax.sgd(1.0) if opt_name == "sgd1" else optax.adam(**ADAM)
  rng = np.random.default_rng(0)
  server_x = rng.random((12, 4, 4, 1)).astype(np.float32)
  alg = codist_lib.codist("mlp_s", "mlp_m", CODIST_DATA, large_ids=[0, 1], server_x=server_x,
                          mode="merged", distill_steps=DISTILL["steps"], distill_lr=DISTILL["lr"],
                          temperature=DISTILL["temperature"], distill_batch=64, k_small=3,
                          k_large=2, server_opt=server_opt, client_lr=0.1, batch_size=4)
  state = alg.init(jax.random.PRNGKey(0))
  uploads = tuple(jax.tree.map(lambda a, k=k: jnp.asarray(
      0.05 * rng.normal(size=(k, *a.shape)), jnp.float32), st.params)
                  for st, k in ((state.small, 3), (state.large, 2)))
  weights = (jnp.array([3.0, 5.0, 0.0]), jnp.array([4.0, 2.0]))
  infos = (ServerInfo(jnp.int32(0), jnp.array([0, 2, 4]), jnp.array([3, 5, 0]),
                      jnp.array([True, True, False])),
           ServerInfo(jnp.int32(0), jnp.array([0, 1]), jnp.array([4, 2]), jnp.array([True, True])))
  return alg, jax.jit(alg.server_update), state, uploads, weights, infos, server_x


def _np_tree(t):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), t)


def _np_fedavg_delta(uploads, weights):
  """Delta_FedAvg per pool: sum_k w_k (theta - theta_k) / sum_k w_k."""
  return [jax.tree.map(lambda u, w=np.asarray(w, np.float64): np.tensordot(w, u, 1) / w.sum(),
                       _np_tree(u)) for u, w in zip(uploads, weights)]


@jax.jit
def _codistill(params_small, params_large, server_x):
  apply_s, apply_l = (zoo_functions(a, CODIST_DATA)[0] for a in ("mlp_s", "mlp_m"))
  return codist_lib.codistill(apply_s, apply_l, params_small, params_large, server_x,
                              jax.random.PRNGKey(0), steps=DISTILL["steps"], lr=DISTILL["lr"],
                              temperature=DISTILL["temperature"], batch_size=64)[:2]


def _distilled(state, server_x):
  """D(theta): both round-start models after s codistillation steps (codistill is checked
  against optax in tests/test_codist.py)."""
  return [_np_tree(d) for d in _codistill(state.small.params, state.large.params, server_x)]


def _flat(t):
  return np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])


def test_merged_with_sgd1_lands_on_the_mix_of_fedavg_mean_and_distilled_model():
  """SGD(1): theta <- theta - g, so the new model shows the pseudo-gradient's value and sign:
  (1 - alpha) * (theta - Delta_FedAvg) + alpha * D(theta)."""
  _, server, state, uploads, weights, infos, server_x = _codist("sgd1")
  theta = [_np_tree(state.small.params), _np_tree(state.large.params)]
  fedavg_mean = [jax.tree.map(np.subtract, t, d)
                 for t, d in zip(theta, _np_fedavg_delta(uploads, weights))]
  dist = _distilled(state, server_x)
  dist_none = theta  # 0 distillation steps: D(theta) = theta
  zero_up = tuple(jax.tree.map(jnp.zeros_like, u) for u in uploads)  # clients returned theta
  cases = [  # (alpha, steps, uploads, FedAvg mean model, distilled model)
      (1.0, DISTILL["steps"], uploads, fedavg_mean, dist),
      (0.5, DISTILL["steps"], uploads, fedavg_mean, dist),
      (0.5, DISTILL["steps"], zero_up, theta, dist),
      (0.5, 0, uploads, fedavg_mean, dist_none),
      (0.25, DISTILL["steps"], uploads, fedavg_mean, dist),
  ]
  for alpha, steps, ups, fa, di in cases:
    knobs = codist_lib.make_knobs("merged", alpha=alpha, **{**DISTILL, "steps": steps})
    new, met = server(state._replace(knobs=knobs), ups, weights, infos, jax.random.PRNGKey(9))
    assert float(met["distill/distilled"]) == 1.0
    got = [new.small.params, new.large.params]
    for g, t, f, d in zip(got, theta, fa, di):
      want = jax.tree.map(lambda f_, d_: (1 - alpha) * f_ + alpha * d_, f, d)
      _assert_close(g, want, rtol=1e-5, atol=1e-6)
      step, to_d, to_f = (_flat(g) - _flat(t), _flat(d) - _flat(t), _flat(f) - _flat(t))
      if np.any(to_d != 0) and not np.any(to_f != 0):  # only distillation: toward D(theta)
        assert step @ to_d > 0.5 * alpha * (to_d @ to_d)
      if np.any(to_f != 0) and not np.any(to_d != 0):  # only FedAvg: toward the client mean
        assert step @ to_f > 0.5 * (1 - alpha) * (to_f @ to_f)
      if alpha == 1.0:  # the FedAvg term drops out entirely
        assert step @ to_d > 0.99 * (to_d @ to_d)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_merged_fedadam_equals_numpy_adam_on_the_mixed_pseudo_gradient(alpha):
  """Two MERGED rounds with FedAdam (optax.adam: bias-corrected moments, eps outside the
  square root): g_t = (1 - alpha) Delta_FedAvg + alpha (theta_t - D(theta_t)),
  m_t = b1 m + (1 - b1) g, v_t = b2 v + (1 - b2) g^2,
  theta_{t+1} = theta_t - lr (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)."""
  _, server, state, uploads, weights, infos, server_x = _codist("adam")
  state = state._replace(knobs=codist_lib.make_knobs("merged", alpha=alpha, **DISTILL))
  lr, b1, b2, eps = ADAM["learning_rate"], ADAM["b1"], ADAM["b2"], ADAM["eps"]
  delta = _np_fedavg_delta(uploads, weights)
  mom = [jax.tree.map(np.zeros_like, d) for d in delta]
  var = [jax.tree.map(np.zeros_like, d) for d in delta]
  for t in (1, 2):
    theta = [_np_tree(state.small.params), _np_tree(state.large.params)]
    dist = _distilled(state, server_x)
    state, _ = server(state, uploads, weights, infos, jax.random.PRNGKey(t))
    got = [state.small.params, state.large.params]
    for p in range(2):
      g = jax.tree.map(lambda d, th, di: (1 - alpha) * d + alpha * (th - di), delta[p], theta[p],
                       dist[p])
      mom[p] = jax.tree.map(lambda m, g_: b1 * m + (1 - b1) * g_, mom[p], g)
      var[p] = jax.tree.map(lambda v, g_: b2 * v + (1 - b2) * g_ * g_, var[p], g)
      want = jax.tree.map(
          lambda th, m, v: th - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps),
          theta[p], mom[p], var[p])
      _assert_close(got[p], want, rtol=1e-5, atol=1e-7)
      opt = (state.small, state.large)[p].opt_state[0]
      _assert_close(opt.mu, mom[p], rtol=1e-4, atol=1e-8)  # the moments saw the MIXED gradient
      if t == 1 and alpha == 1.0:  # Adam's first step is -lr * g / (|g| + eps): toward D(theta)
        step, to_d = _flat(got[p]) - _flat(theta[p]), _flat(dist[p]) - _flat(theta[p])
        big = np.abs(to_d) > 1e-4
        assert big.sum() > 0.5 * big.size
        np.testing.assert_array_equal(np.sign(step[big]), np.sign(to_d[big]))
