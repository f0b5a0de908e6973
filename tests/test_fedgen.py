"""FedGen (arXiv 2105.10056) over model pools: the feature-space generator, its objective and
the clients' regularizer against NumPy statements, the server step, and a short training run
on digits."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from conftest import tiny_config
from fedjax_sim.protocol import ClientInfo, ServerInfo
from fedjax_sim.algorithms import fedgen as fg
from fedjax_sim.algorithms.registry import DataSpec

L, D, E, H = 4, 3, 5, 6


def _np_generate(g, labels, eps):
  h = np.concatenate([eps, np.eye(L)[labels]], -1) @ g["w1"]
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * g["scale"] + g["shift"]
  return np.maximum(h, 0) @ g["w2"] + g["b2"]


def _np_ce(logits, labels):
  z = logits - logits.max(-1, keepdims=True)
  lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -lp[np.arange(len(labels)), labels]


def _setup(seed=0, b=8, k=3):
  rng = np.random.default_rng(seed)
  gen = jax.tree.map(np.asarray, fg.init_generator(jax.random.PRNGKey(seed), E, L, H, D))
  gen["scale"] = rng.uniform(0.5, 1.5, H).astype(np.float32)  # not the trivial BN affine
  gen["shift"] = rng.normal(size=H).astype(np.float32) * 0.1
  labels = rng.integers(0, L, b).astype(np.int32)
  eps = rng.random((b, E)).astype(np.float32)
  heads = {"kernel": rng.normal(size=(k, D, L)).astype(np.float32),
           "bias": rng.normal(size=(k, L)).astype(np.float32)}
  return gen, labels, eps, heads


def test_generator_objective_equals_numpy():
  gen, labels, eps, heads = _setup()
  z = _np_generate(gen, labels, eps)
  np.testing.assert_allclose(fg.generate(jax.tree.map(jnp.asarray, gen), jnp.asarray(labels),
                                         jnp.asarray(eps), L), z, rtol=1e-4, atol=1e-5)
  a = np.array([0.5, 0.2, 0.3], np.float32)
  # Paper Eq. 4: CE of the a-weighted ensemble of the clients' heads on G(eps | y).
  logits = sum(a[k] * (z @ heads["kernel"][k] + heads["bias"][k]) for k in range(3))
  ce = _np_ce(logits, labels).mean()
  # The official diversity loss: exp(-mean_ij mean_e (eps_i - eps_j)^2 * mean_d |z_i - z_j|).
  d_eps = ((eps[:, None] - eps[None]) ** 2).mean(-1)
  d_z = np.abs(z[:, None] - z[None]).mean(-1)
  div = np.exp(-(d_eps * d_z).mean())
  for eta in (0.0, 0.7):
    got = fg.generator_loss(jax.tree.map(jnp.asarray, gen), jax.tree.map(jnp.asarray, heads),
                            jnp.asarray(a), jnp.asarray(labels), jnp.asarray(eps),
                            num_classes=L, eta=eta)
    np.testing.assert_allclose(got, ce + eta * div, rtol=1e-5)


def test_client_regularizer_equals_numpy_and_trains_only_the_head():
  gen, labels, eps, heads = _setup(1)
  head = jax.tree.map(lambda h: jnp.asarray(h[0]), heads)
  z = _np_generate(gen, labels, eps)
  want = _np_ce(z @ heads["kernel"][0] + heads["bias"][0], labels).mean()
  jgen = jax.tree.map(jnp.asarray, gen)
  got = fg.client_regularizer(head, jgen, jnp.asarray(labels), jnp.asarray(eps), L)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  g_gen = jax.grad(lambda g: fg.client_regularizer(head, g, jnp.asarray(labels),
                                                   jnp.asarray(eps), L))(jgen)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g_gen))


def test_train_generator_lowers_the_objective():
  gen, _, _, heads = _setup(2)
  p_hat = jnp.array([0.4, 0.1, 0.0, 0.5])
  labels, eps = fg.sample_labels_noise(jax.random.PRNGKey(8), p_hat, 64, E)  # held-out draws
  a = jnp.array([0.2, 0.3, 0.5])
  jgen, jheads = jax.tree.map(jnp.asarray, gen), jax.tree.map(jnp.asarray, heads)

  @jax.jit
  def before_after(g):
    loss = lambda g: fg.generator_loss(g, jheads, a, jnp.asarray(labels), jnp.asarray(eps),
                                       num_classes=L)
    trained, _ = fg.train_generator(g, jheads, a, p_hat, jax.random.PRNGKey(3), steps=60,
                                    batch=16, lr=0.01, noise_dim=E, num_classes=L)
    return loss(g), loss(trained)

  before, after = before_after(jgen)
  assert float(after) < 0.8 * float(before), (before, after)
  # Labels are drawn from p^: an absent class is never generated.
  labels, _ = fg.sample_labels_noise(jax.random.PRNGKey(4), p_hat, 2000, E)
  freq = np.bincount(np.asarray(labels), minlength=L) / 2000
  assert freq[2] == 0 and np.allclose(freq, p_hat, atol=0.04)


def _small_data(num_clients=4, n=16):
  from conftest import random_image_clients
  return random_image_clients(num_clients, n=n, num_classes=L)


def test_server_step_table_by_client_and_weighted_head():
  """Counts stored per client id, p^ from every reporter so far, head = example-weighted
  mean; padding slots change nothing."""
  spec = DataSpec((8, 8, 1), L, 6)
  alg = fg.fedgen(("mlp_s", "mlp_m"), spec, 4, client_lr=0.1, batch_size=8, dim=D,
                  noise_dim=E, hidden_dim=H, generator_steps=3)
  state = alg.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(5)
  ids = [np.array([0, 2, 2], np.int32), np.array([3, 5], np.int32)]  # slot 3 of pool 0: pad
  valid = [np.array([True, True, False]), np.array([True, True])]
  ex = [np.array([10, 30, 0], np.int32), np.array([20, 40], np.int32)]
  heads = [{"kernel": rng.normal(size=(len(v), D, L)).astype(np.float32),
            "bias": rng.normal(size=(len(v), L)).astype(np.float32)} for v in valid]
  counts = [rng.integers(0, 9, (len(v), L)).astype(np.float32) for v in valid]
  uploads = tuple(fg.GenUpload(jax.tree.map(jnp.asarray, h), jnp.asarray(c))
                  for h, c in zip(heads, counts))
  infos = tuple(ServerInfo(jnp.int32(0), jnp.asarray(i), jnp.asarray(e), jnp.asarray(v))
                for i, e, v in zip(ids, ex, valid))
  new, metrics = jax.jit(alg.server_update)(state, uploads, tuple(jnp.asarray(e, jnp.float32)
                                                                  for e in ex), infos,
                                            jax.random.PRNGKey(1))
  want_counts = np.zeros((6, L), np.float32)
  for i, c, v in zip(ids, counts, valid):
    want_counts[i[v]] = c[v]
  np.testing.assert_array_equal(new.counts, want_counts)
  w = np.concatenate(ex).astype(np.float32) * np.concatenate(valid)
  for key in ("kernel", "bias"):
    stacked = np.concatenate([h[key] for h in heads])
    np.testing.assert_allclose(new.head[key], np.tensordot(w / w.sum(), stacked, 1), rtol=1e-5,
                               atol=1e-6)
  _, _, p_hat = alg.broadcast(new)
  np.testing.assert_allclose(p_hat, want_counts.sum(0) / want_counts.sum(), rtol=1e-6)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new.generator),
                                                   jax.tree.leaves(state.generator)))
  hs = D * L + L
  assert float(metrics["comm/upload_scalars"]) == 4 * (hs + L)
  # A later round where only client 0 reports (new counts): the others' counts stay.
  later = tuple(u._replace(counts=u.counts + 1.0) for u in uploads)
  only0 = ([True, False, False], [False, False])
  again, _ = jax.jit(alg.server_update)(
      new, later, tuple(jnp.asarray(e * np.array(v), jnp.float32) for e, v in zip(ex, only0)),
      tuple(i._replace(valid=jnp.asarray(v)) for i, v in zip(infos, only0)),
      jax.random.PRNGKey(2))
  want_counts[0] = counts[0][0] + 1.0
  np.testing.assert_array_equal(again.counts, want_counts)


def test_round_zero_has_no_regularizer_later_rounds_do():
  spec = DataSpec((8, 8, 1), L, 4)
  data = _small_data()
  one = jax.tree.map(lambda a: a[1], data)
  info = ClientInfo(jnp.int32(1), jnp.int32(0), jnp.bool_(True))

  @jax.jit
  @jax.vmap
  def head_after(alpha, reported):  # alpha traced: one compiled client update for all cases
    alg = fg.fedgen(("mlp_s",), spec, 2, client_lr=0.1, batch_size=8, dim=D, noise_dim=E,
                    hidden_dim=H, alpha=alpha)
    server = alg.init(jax.random.PRNGKey(0))
    server = server._replace(counts=server.counts.at[0].set(reported * jnp.arange(1.0, L + 1)))
    params = alg.pools[0].init_client(jax.random.PRNGKey(1))
    up, _, _ = alg.pools[0].client_update(alg.broadcast(server), params, one,
                                          jax.random.PRNGKey(2), info)
    return up.head["kernel"]

  # (alpha, counts reported?): round 0 (no counts) trains like alpha = 0; later it does not.
  on0, off0, on1, off1 = head_after(jnp.array([5.0, 0.0, 5.0, 0.0]),
                                    jnp.array([0.0, 0.0, 1.0, 1.0]))
  np.testing.assert_array_equal(on0, off0)
  assert not np.allclose(on1, off1)


def test_fedgen_trains_on_digits():
  from fedjax_sim import evaluation
  from fedjax_sim.launch.experiment import build_experiment
  from fedjax_sim.round import init_state, make_round
  cfg = tiny_config(algorithm="fedgen", rounds=6, clients_per_round=8, client_lr=0.1,
                    batch_size=10)
  cfg.data.num_clients = 8
  cfg.archs = ("mlp_m",)
  cfg.fedgen = ml_collections.ConfigDict({"noise_dim": 64, "hidden_dim": 64})
  exp = build_experiment(cfg)
  alg = exp.algorithm
  state = init_state(alg, None, 8, seed=0, mesh=exp.mesh)
  round_fn = make_round(alg, None, seed=0, mesh=exp.mesh, rounds_per_call=3)
  losses, gen_losses = [], []
  for _ in range(2):
    state, m = round_fn(state, exp.data.train)
    losses += np.asarray(m["mlp_m/loss"]).tolist()
    gen_losses += np.asarray(m["server/generator_loss"]).tolist()
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
  assert gen_losses[-1] < gen_losses[0]
  raw = evaluation.make_evaluate(alg)(state.server, state.clients, exp.data.test,
                                      exp.data.test_x, exp.data.test_y)
  acc = evaluation.summarize(raw, len(exp.data.test_y))["test_accuracy"]
  assert acc > 0.5, acc  # extractors + global head on the clients' own splits; chance 0.1
  # The global head reads the generator's features as their labels.
  head, gen, p_hat = alg.broadcast(state.server)
  labels, eps = fg.sample_labels_noise(jax.random.PRNGKey(0), p_hat, 200, 64)
  z = fg.generate(gen, labels, eps, exp.data.num_classes)
  pred = jnp.argmax(z @ head["kernel"] + head["bias"], -1)
  assert float(jnp.mean(pred == labels)) > 0.5
