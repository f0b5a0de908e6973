"""FedMuscle: the Muscle loss against its formula (docs/decisions.md#fedmuscle), the round, the
multi-task data (dataset digits_multitask), the local-training baseline behind Delta(%), and
``fedjax-sim run`` writing delta_pct."""
import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.algorithms import fedmuscle as fm
from fedjax_sim.algorithms import losses
from fedjax_sim.metrics import l2_normalize
from fedjax_sim.data import build_federated_data, build_multitask_digits
from fedjax_sim.data.multitask import TASK_NAMES, task_tables
from fedjax_sim.round import init_state, make_mesh, make_round

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TAU_N, TAU_N1 = 0.2, 0.15


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _brute_force_muscle(anchor, others, tau_n=TAU_N, tau_n1=TAU_N1):
  """The paper's formula, one negative combination j in [B]^M at a time (float64)."""
  a, o = np.float64(anchor), np.float64(others)
  m_count, b = o.shape[:2]
  gamma = 1.0 / tau_n1 - 1.0 / tau_n

  def log_term(i, j):
    sim = sum(a[i] @ o[m, j[m]] for m in range(m_count)) / tau_n
    log_alpha = -0.5 * gamma * sum(o[m, j[m]] @ o[mp, j[mp]] for m in range(m_count)
                                   for mp in range(m_count) if mp != m)
    return sim + log_alpha

  total = 0.0
  for i in range(b):
    den = np.logaddexp.reduce([log_term(i, j)
                               for j in itertools.product(range(b), repeat=m_count)])
    total += den - log_term(i, (i,) * m_count)
  return total / b


def test_muscle_with_two_models_is_info_nce():
  """N = 2 (M = 1): alpha = 1, so the loss is InfoNCE at tau_N, computed here from its formula."""
  rng = np.random.default_rng(0)
  a, p = _unit(rng, 6, 5), _unit(rng, 6, 5)
  logits = a.astype(np.float64) @ p.T.astype(np.float64) / TAU_N
  formula = np.mean([-(logits[i, i] - np.logaddexp.reduce(logits[i])) for i in range(6)])
  np.testing.assert_allclose(losses.muscle_loss(a, p[None], TAU_N, TAU_N1), formula, rtol=1e-5)
  np.testing.assert_allclose(losses.info_nce(a, p, TAU_N), formula, rtol=1e-5)
  np.testing.assert_allclose(losses.pairwise_info_nce(a, p[None], TAU_N), formula, rtol=1e-5)


@pytest.mark.parametrize("m_count,b", [(2, 4), (3, 3), (4, 3)])
def test_vectorized_muscle_equals_brute_force_over_all_combinations(m_count, b):
  rng = np.random.default_rng(m_count)
  a, o = _unit(rng, b, 5), _unit(rng, m_count, b, 5)
  want = _brute_force_muscle(a, o)
  np.testing.assert_allclose(losses.muscle_loss(a, o), want, rtol=2e-5)
  np.testing.assert_allclose(losses.muscle_loss_dense(a, o), want, rtol=2e-5)


def test_alpha_weights_differ_from_pairwise():
  """With M >= 2 the weights matter: gamma = 0 (tau_N-1 = tau_N) gives a different value."""
  rng = np.random.default_rng(7)
  a, o = _unit(rng, 4, 5), _unit(rng, 2, 4, 5)
  weighted = float(losses.muscle_loss(a, o, TAU_N, TAU_N1))
  unweighted = float(losses.muscle_loss(a, o, TAU_N, TAU_N))
  np.testing.assert_allclose(unweighted, _brute_force_muscle(a, o, TAU_N, TAU_N), rtol=2e-5)
  assert abs(weighted - unweighted) > 1e-3


def test_muscle_is_stable_for_aligned_representations():
  """Perfectly aligned, widely spread tuples: large logits, no overflow or NaN."""
  rng = np.random.default_rng(3)
  a = _unit(rng, 8, 16)
  o = np.stack([a] * 4)
  val = losses.muscle_loss(a, o)
  assert np.isfinite(val)
  np.testing.assert_allclose(val, losses.muscle_loss_dense(a, o), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m_count", [1, 2, 3, 4])
def test_gradients_finite_and_match_dense(m_count):
  rng = np.random.default_rng(10 + m_count)
  b, d = 6, 8
  raw, o = rng.normal(size=(b, d)).astype(np.float32), _unit(rng, m_count, b, d)
  f = lambda fn: jax.grad(lambda x: fn(l2_normalize(x), o))(jnp.asarray(raw))
  g = f(losses.muscle_loss)
  assert np.all(np.isfinite(g)) and np.any(np.abs(g) > 0)
  np.testing.assert_allclose(g, f(losses.muscle_loss_dense), rtol=1e-4, atol=1e-6)
  for loss in (lambda z, x: losses.pairwise_info_nce(z, x, TAU_N),
               lambda z, x: losses.gram_volume_loss(z, x, TAU_N)):
    assert np.all(np.isfinite(f(loss)))


def test_gram_volume_is_the_parallelotope_volume():
  """Two unit vectors at angle theta span area sin(theta); a repeated vector spans none."""
  theta = 0.3
  v = jnp.array([[1.0, 0.0, 0.0], [np.cos(theta), np.sin(theta), 0.0]])
  np.testing.assert_allclose(losses.gram_volume(v), np.sin(theta), rtol=1e-5)
  np.testing.assert_allclose(losses.gram_volume(jnp.stack([v[0], v[0]])), 0.0, atol=1e-5)


def test_delta_percent():
  np.testing.assert_allclose(fm.delta_percent([0.6, 0.9], [0.5, 1.0]), (20.0 - 10.0) / 2)


def test_public_split_is_disjoint_from_users_and_tasks_map_labels():
  d = build_multitask_digits(num_clients=8, examples_per_user=20, public_per_class=5, seed=1)
  from fedjax_sim.data import sources
  ds = sources.load_digits()
  public_x, public_idx, tasks = d.aux["public_x"], d.aux["public_idx"], d.aux["tasks"]
  assert public_x.shape == (50, 8, 8, 1)
  assert np.all(np.bincount(ds.train_y[public_idx]) == 5)
  pub = {ds.train_x[i].tobytes() for i in public_idx}
  x, m = np.asarray(d.train.x), np.asarray(d.train.mask)
  for u in range(8):  # no user example equals a public one (digits has few exact duplicates)
    assert not any(x[u, n].tobytes() in pub for n in np.flatnonzero(m[u]))
  label_map, num_classes = task_tables()
  np.testing.assert_array_equal(d.aux["task_classes"], num_classes)
  np.testing.assert_array_equal(d.aux["task_label_map"], label_map)
  for u, t in enumerate(tasks):
    np.testing.assert_array_equal(np.asarray(d.test.y[u]), label_map[t][ds.test_y])
  assert max(np.asarray(d.train.y)[tasks == TASK_NAMES.index("parity")].ravel()) <= 1


def test_multitask_dataset_through_the_pipeline_checks_its_knobs():
  """The registered dataset reads its knobs from the data config (one line per bad knob)."""
  from fedjax_sim.data import DatasetError
  cfg = {"dataset": "digits_multitask", "num_clients": 6, "examples_per_user": 10,
         "public_per_class": 3, "partition": "iid", "tasks": ("parity", "mod3")}
  d = build_federated_data(cfg, batch_size=5, seed=0)
  assert d.num_clients == 6 and d.train.x.shape[1] == 10 and d.num_classes == 10
  np.testing.assert_array_equal(d.aux["tasks"], [1, 3, 1, 3, 1, 3])
  for key, value, match in (("public_per_class", 0, "public_per_class=0"),
                            ("examples_per_user", 0, "examples_per_user=0"),
                            ("tasks", ("parity", "colour"), "data.tasks=")):
    with pytest.raises(DatasetError, match=rf"{match}.*--config.data.{key}"):
      build_federated_data({**cfg, key: value}, batch_size=5, seed=0)


def _tiny(num_users=4, seed=0):
  return build_multitask_digits(num_clients=num_users, examples_per_user=10, public_per_class=2,
                                seed=seed)


def _tiny_alg(d, **kw):
  return fm.fedmuscle(("mlp_s", "mlp_m"), d.aux["tasks"], d.aux["public_x"],
                      input_shape=d.input_shape, task_classes=d.aux["task_classes"], M=2,
                      public_batch=4, proj_dim=4, align_steps=1, client_lr=0.05,
                      client_momentum=0.9, batch_size=10, **kw)


def test_round_aligns_from_round_one_and_local_never_aligns():
  """Tiny 2-pool, 4-user round: uploads stored, alignment only with others' fresh matrices."""
  d = _tiny()
  alg = _tiny_alg(d)
  mesh = make_mesh(1)
  round_fn = make_round(alg, seed=0, mesh=mesh, rounds_per_call=2, donate=False)
  state = fm.with_tasks(init_state(alg, None, 4, seed=0, mesh=mesh), alg, d.aux["tasks"])
  out, m = round_fn(state, d.train)
  np.testing.assert_array_equal(m["aligned"], [0.0, 1.0])
  assert np.all(np.isfinite(m["align_loss"])) and m["align_loss"][1] > 0
  np.testing.assert_array_equal(out.server.rep_round, [1, 1, 1, 1])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out.server.reps), axis=-1), 1.0, rtol=1e-5)
  out_l, m_l = round_fn(fm.set_method(state, "local"), d.train)
  np.testing.assert_array_equal(m_l["aligned"], [0.0, 0.0])
  # Round 0 is identical (no alignment yet); round 1 differs only through alignment.
  p0 = jax.tree.leaves(out.clients[0].params)
  p0_l = jax.tree.leaves(out_l.clients[0].params)
  assert any(not np.allclose(a, b) for a, b in zip(p0, p0_l))
  np.testing.assert_array_equal(np.asarray(out.clients[1].task),
                                d.aux["tasks"][alg.pools[1].client_ids])


def test_local_baseline_is_the_local_method_and_gives_delta():
  """The shadow model trained alongside (local_baseline=True) is the `local` method's model
  (same init, data, batch order; no alignment), and the evaluate hook's delta_pct is Delta(%)
  of the per-user accuracies of the two runs."""
  d = _tiny()
  mesh = make_mesh(1)
  with_base = _tiny_alg(d, local_baseline=True)
  plain = _tiny_alg(d)
  run = lambda alg, method: make_round(alg, seed=0, mesh=mesh, rounds_per_call=3, donate=False)(
      fm.set_method(init_state(alg, None, 4, seed=0, mesh=mesh), method), d.train)
  both, m = run(with_base, "muscle")
  assert np.all(m["aligned"][1:] == 1.0) and np.all(np.isfinite(m["local_loss"]))
  local, _ = run(plain, "local")
  muscle, _ = run(plain, "muscle")
  for p in range(2):  # same program shape up to the shadow: equal to float32 rounding
    for got, want in ((both.clients[p].local, local.clients[p].params),
                      (both.clients[p].params, muscle.clients[p].params)):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  row = with_base.evaluate(both.server, both.clients, d)
  from fedjax_sim.evaluation import make_evaluate
  acc = lambda alg, st: fm.user_accuracy(make_evaluate(alg)(
      st.server, fm.with_tasks(st, alg, d.aux["tasks"]).clients, d.test, d.test_x, d.test_y),
      alg.pools)
  want = fm.delta_percent(acc(plain, muscle), acc(plain, local))
  np.testing.assert_allclose(row["delta_pct"], want, atol=1e-9)
  assert 0 < row["local_test_accuracy"] <= 1 and 0 < row["test_accuracy"] <= 1
  # Before round 1 both models are the initial one: Delta is 0, tasks right without with_tasks.
  s0 = init_state(with_base, None, 4, seed=0, mesh=mesh)
  row0 = with_base.evaluate(s0.server, s0.clients, d)
  assert row0["delta_pct"] == 0.0
  np.testing.assert_allclose(row0["test_accuracy"], plain.evaluate(
      s0.server, fm.with_tasks(s0, plain, d.aux["tasks"]).clients, d)["test_accuracy"])


def test_registry_builder_needs_multitask_data():
  from fedjax_sim.algorithms import registry
  from fedjax_sim.errors import ConfigError
  from fedjax_sim.launch.configs.fedmuscle_digits import get_config
  cfg = get_config("smoke")
  d = _tiny()
  spec = registry.DataSpec(d.input_shape, d.num_classes, d.num_clients)
  cfg.archs = ("mlp_s", "mlp_m")
  ctx = registry.BuildContext.from_config(cfg, spec, data=d)
  alg = registry.build("fedmuscle", ctx, {"M": 2, "public_batch": 4, "proj_dim": 4})
  assert [len(p.client_ids) for p in alg.pools] == [2, 2] and alg.evaluate is not None
  plain = build_federated_data({"num_clients": 4}, batch_size=10)
  with pytest.raises(ConfigError, match="--config.data.dataset=digits_multitask"):
    registry.build("fedmuscle", registry.BuildContext.from_config(cfg, spec, data=plain), {})
  with pytest.raises(ConfigError, match="no knob client_ids"):
    registry.build("fedmuscle", ctx, {"client_ids": None})


def test_cli_run_writes_delta_pct(tmp_path):
  """fedjax-sim run --config=launch/configs/fedmuscle_digits.py (tiny): every metrics.jsonl
  evaluation row has a numeric delta_pct (0 at round 0, before any alignment)."""
  tiny = ["--config.data.num_clients=4", "--config.data.examples_per_user=10",
          "--config.data.public_per_class=4", "--config.archs=('mlp_s', 'mlp_m')",
          "--config.clients_per_round=4", "--config.progress=False"]
  cmd = [sys.executable, "-m", "fedjax_sim.launch.main", "run",
         "--config=launch/configs/fedmuscle_digits.py:smoke", f"--workdir={tmp_path}/run", *tiny]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["round"] for r in rows] == [0, 2]
  assert all(isinstance(r["delta_pct"], float) and np.isfinite(r["delta_pct"]) for r in rows)
  assert rows[0]["delta_pct"] == 0.0 and "local_test_accuracy" in rows[-1]
