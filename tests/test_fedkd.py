"""FedKD (arXiv 2108.13323) over model pools: the adaptive mutual distillation loss, the SVD
compression with its energy schedule and the server step against NumPy statements, and a
short training run on digits."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from fedjax_sim.protocol import ServerInfo
from fedjax_sim.algorithms import fedkd as kd
from fedjax_sim.algorithms.registry import DataSpec

L, D = 5, 4


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_mutual_distillation_loss_equals_numpy():
  rng = np.random.default_rng(0)
  b = 7
  lt, ls = rng.normal(size=(b, L)) * 2, rng.normal(size=(b, L))
  ht, hs = rng.normal(size=(b, D)), rng.normal(size=(b, D))
  w_h = rng.normal(size=(D, D))
  y = rng.integers(0, L, b)
  mask = np.array([1, 1, 1, 0, 1, 1, 0], bool)  # two padding rows
  got, parts = kd.mutual_distillation_loss(*(jnp.asarray(a, jnp.float32) for a in
                                             (lt, ls, ht, hs, w_h)), jnp.asarray(y),
                                           jnp.asarray(mask))
  # The paper's losses on the real rows; KL and MSE averaged over entries (PyTorch 'mean').
  r = mask
  lpt, lps = _np_log_softmax(lt[r]), _np_log_softmax(ls[r])
  ce_t = -lpt[np.arange(r.sum()), y[r]].mean()
  ce_s = -lps[np.arange(r.sum()), y[r]].mean()
  kl_t = np.mean(np.exp(lps) * (lps - lpt))  # KL(y_s, y_t): the mentor learns from the mentee
  kl_s = np.mean(np.exp(lpt) * (lpt - lps))
  mse = np.mean((ht[r] - hs[r] @ w_h) ** 2)  # MSE(H_t, W_h H_s)
  l_t = ce_t + kl_t / (ce_t + ce_s) + mse / (ce_t + ce_s)
  l_s = ce_s + kl_s / (ce_t + ce_s) + mse / (ce_t + ce_s)
  np.testing.assert_allclose(got, l_t + l_s, rtol=1e-5)
  for k, v in dict(ce_t=ce_t, ce_s=ce_s, kl_t=kl_t, kl_s=kl_s, mse=mse,
                   weight=1 / (ce_t + ce_s)).items():
    np.testing.assert_allclose(parts[k], v, rtol=1e-5, err_msg=k)
  # Identical models and W_h = I: no distillation or hidden loss is left.
  same, p = kd.mutual_distillation_loss(jnp.asarray(lt), jnp.asarray(lt), jnp.asarray(ht),
                                        jnp.asarray(ht), jnp.eye(D), jnp.asarray(y),
                                        jnp.asarray(mask))
  np.testing.assert_allclose(same, 2 * p["ce_t"], rtol=1e-6)


def _np_compress(mat, energy):
  u, s, vt = np.linalg.svd(mat, full_matrices=False)
  e = s ** 2
  r = next(k for k in range(1, len(s) + 1) if e[:k].sum() >= energy * e.sum())
  return (u[:, :r] * s[:r]) @ vt[:r], r


@pytest.mark.parametrize("energy", [0.5, 0.95, 0.98, 1.0])
def test_svd_compress_equals_numpy(energy):
  rng = np.random.default_rng(1)
  # A known spectrum: singular values 8, 4, 2, 1, 0.5 (energy fractions 0.76, 0.95, ...).
  q1, _ = np.linalg.qr(rng.normal(size=(9, 5)))
  q2, _ = np.linalg.qr(rng.normal(size=(6, 5)))
  mat = (q1 * np.array([8, 4, 2, 1, 0.5])) @ q2.T  # [9, 6], rank 5
  want, r = _np_compress(mat, energy)
  got, rank = jax.jit(kd.svd_compress)(jnp.asarray(mat, jnp.float32), jnp.float32(energy))
  assert int(rank) == r
  np.testing.assert_allclose(got, want, atol=2e-5)
  if energy == 1.0:
    np.testing.assert_allclose(got, mat, atol=2e-5)
  # Equal singular values need the full rank; the official code's search (r < min(m, n),
  # else 0) would drop the whole matrix.
  eye = jnp.eye(3, dtype=jnp.float32)
  got, rank = kd.svd_compress(eye, jnp.float32(energy))
  assert int(rank) == max(1, int(np.ceil(energy * 3 - 1e-6)))


def test_compress_tree_counts_factors_and_reshapes_kernels():
  rng = np.random.default_rng(2)
  tree = {"conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),  # as [18, 4]
          "dense": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
          "row": jnp.asarray(rng.normal(size=(1, 5)), jnp.float32)}  # a 1 x n matrix: dense
  got, sent = kd.compress_tree(tree, jnp.float32(0.9))
  want_conv, r_conv = _np_compress(np.asarray(tree["conv"]).reshape(18, 4), 0.9)
  want_dense, r_dense = _np_compress(np.asarray(tree["dense"]), 0.9)
  np.testing.assert_allclose(got["conv"], want_conv.reshape(3, 3, 2, 4), atol=2e-5)
  np.testing.assert_allclose(got["dense"], want_dense, atol=2e-5)
  np.testing.assert_array_equal(got["bias"], tree["bias"])
  np.testing.assert_array_equal(got["row"], tree["row"])
  assert float(sent) == r_conv * (18 + 4 + 1) + r_dense * (6 + 5 + 1) + 5 + 5


def test_energy_schedule_is_the_official_linear_ramp():
  rounds = 10
  t = np.array([kd.energy_threshold(r, rounds, 0.95, 0.98) for r in range(rounds)])
  np.testing.assert_allclose(t, 0.95 + (np.arange(rounds) + 1) / rounds * 0.03, rtol=1e-6)
  assert abs(t[-1] - 0.98) < 1e-6


def test_server_step_equals_numpy():
  """Mentee + SVD_T(unweighted mean over the real slots of SVD_T(Delta_i)); padding ignored;
  the upload counts the factors of every real client's compressed update."""
  spec = DataSpec((8, 8, 1), L, 6)
  alg = kd.fedkd(("mlp_s", "mlp_m"), spec, 4, rounds=5, client_lr=0.1, batch_size=8, dim=D,
                 T_start=0.6, T_end=0.7)
  state = alg.init(jax.random.PRNGKey(0))
  shapes = jax.tree.map(lambda a: a.shape, state.mentee)
  rng = np.random.default_rng(3)
  # Pool 0: 3 slots (the last is padding), pool 1: 2 slots.
  deltas = [jax.tree.map(lambda s: jnp.asarray(rng.normal(size=(k, *s)), jnp.float32), shapes,
                         is_leaf=lambda x: isinstance(x, tuple)) for k in (3, 2)]
  valid = [np.array([True, True, False]), np.array([True, True])]
  infos = tuple(ServerInfo(jnp.int32(2), jnp.arange(len(v), dtype=jnp.int32),
                           jnp.full((len(v),), 10, jnp.int32), jnp.asarray(v)) for v in valid)
  new, metrics = jax.jit(alg.server_update)(state, tuple(deltas), (jnp.ones(3), jnp.ones(2)),
                                            infos, jax.random.PRNGKey(1))
  energy = 0.6 + 3 / 5 * 0.1  # T(t = 2) of R = 5
  np.testing.assert_allclose(metrics["energy"], energy, rtol=1e-6)
  flat_new, _ = jax.tree_util.tree_flatten_with_path(new.mentee)
  sent = 0
  for (path, got), old, d0, d1 in zip(flat_new, jax.tree.leaves(state.mentee),
                                      jax.tree.leaves(deltas[0]), jax.tree.leaves(deltas[1])):
    real = list(np.asarray(d0)[:2]) + list(np.asarray(d1))  # the 4 real clients' updates
    if old.ndim >= 2:
      m, n = int(np.prod(old.shape[:-1])), old.shape[-1]
      comp = [_np_compress(d.reshape(m, n), energy) for d in real]
      sent += sum(r * (m + n + 1) for _, r in comp)
      mean = np.mean([c.reshape(old.shape) for c, _ in comp], 0)
      mean = _np_compress(mean.reshape(m, n), energy)[0].reshape(old.shape)
    else:
      sent += 4 * old.size
      mean = np.mean(real, 0)
    np.testing.assert_allclose(got, np.asarray(old) + mean, atol=3e-5,
                               err_msg=jax.tree_util.keystr(path))
  assert float(metrics["comm/upload_scalars"]) == sent


def test_fedkd_trains_mentors_and_the_shared_mentee():
  from fedjax_sim import evaluation
  from fedjax_sim.algorithms.rm import split_model
  from fedjax_sim.launch.experiment import build_experiment
  from fedjax_sim.round import init_state, make_round
  cfg = tiny_config(algorithm="fedkd", rounds=6, clients_per_round=8, client_lr=0.1,
                    batch_size=10)
  cfg.data.num_clients = 8
  cfg.archs = ("mlp_m",)  # one pool of mentors, the mentee mlp_s
  cfg.fedkd = ml_collections.ConfigDict({"mentee": "mlp_s"})
  exp = build_experiment(cfg)
  alg = exp.algorithm
  state = init_state(alg, None, 8, seed=0, mesh=exp.mesh)
  round_fn = make_round(alg, None, seed=0, mesh=exp.mesh, rounds_per_call=3)
  losses = []
  for _ in range(2):
    state, m = round_fn(state, exp.data.train)
    losses += np.asarray(m["mlp_m/loss"]).tolist()
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
  raw = evaluation.make_evaluate(alg)(state.server, state.clients, exp.data.test,
                                      exp.data.test_x, exp.data.test_y)
  acc = evaluation.summarize(raw, len(exp.data.test_y))["test_accuracy"]
  assert acc > 0.5, acc  # mentors on their own test splits; chance is 0.1
  student = split_model("mlp_s", exp.data.input_shape, exp.data.num_classes, 32)
  pred = jnp.argmax(student.apply(state.server.mentee, exp.data.test_x), -1)
  assert float(jnp.mean(pred == exp.data.test_y)) > 0.3  # the global mentee learned too
