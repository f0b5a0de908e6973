"""Client-level DP (fedjax_sim/dp.py) and the Poisson sampler (fedjax_sim/sampling.py).

What is checked, each against something independent of the code under test:

* sigma = 0 with C = inf is the wrapped algorithm with uniform client weights, bit for bit
  (FedAvg and FedAdam, 3 rounds with a padding slot);
* every clipped delta's norm is <= C, and a clipped delta is the unclipped one rescaled;
* the noise on the mean delta has std z C / m (and z_Delta C / m with adaptive clipping)
  within 3 standard errors, over 40 rounds' server keys;
* adaptive clipping follows Andrew et al.'s geometric update (a NumPy restatement) and
  tracks the target quantile of the update norms;
* the DP round (Poisson cohort, noise, adaptive clipping) equals the per-client reference
  loop (fedjax_sim/reference.py);
* a DP run killed with SIGKILL after a checkpoint and resumed equals an uninterrupted one;
* the Poisson sampler includes each client with probability q, marks empty slots -1 and
  counts truncated rounds.

Axis legend: C clients, K cohort, P parameters.
"""
import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from fedjax_sim import dp, sampling, seeding
from fedjax_sim.dp import DPUpload
from fedjax_sim.launch.experiment import build_experiment, train_and_evaluate
from fedjax_sim.protocol import ClientInfo, ServerInfo
from fedjax_sim.reference import make_reference_round
from fedjax_sim.round import init_state, make_round

TESTS = os.path.dirname(os.path.abspath(__file__))


def dp_config(**overrides):
  """A tiny DP run: 12 digits clients, Poisson sampling at q = 5/12 into 8 slots, z = 1,
  adaptive clipping from C_0 = 0.5 (sigma_b = 1), MLP(16), 4 rounds (eval and checkpoint
  every 2)."""
  c = tiny_config(sampler="poisson", clients_per_round=5, cohort_bound=8, chunk_size=2,
                  **overrides)
  c.data.num_clients = 12
  c.model_kwargs.hidden = (16,)
  c.dp.update(dict(enabled=True, noise_multiplier=1.0, clip_norm=0.5, adaptive=True,
                   clipped_count_stddev=1.0))
  return c


def _experiment(cfg):
  return build_experiment(cfg)


@pytest.fixture(scope="module")
def tiny_fedavg():
  """The built experiment of ``tiny_config()`` (FedAvg, 20 clients, K = 5, MLP(32))."""
  return build_experiment(tiny_config(chunk_size=2, rounds_per_call=3))


def _fedavg_on(num_params: int):
  """The shipped FedAvg server update (SGD, lr 1) over one parameter vector float32 [P]."""
  from fedjax_sim.algorithms import fedavg
  return fedavg(lambda p, x: x, lambda rng: {"w": jnp.zeros(num_params)}, client_lr=0.1,
                batch_size=10)


def test_no_noise_no_clipping_is_the_algorithm_with_uniform_weights():
  """FedAdam (its optimizer state sees the mean delta), 3 rounds fused by lax.scan, K = 5 in
  chunks of 2 (one padding slot)."""
  cfg = tiny_config(algorithm="fedadam", server_lr=0.01, chunk_size=2, rounds_per_call=3)
  exp = _experiment(cfg)
  alg = exp.algorithm
  uniform = alg._replace(server_update=lambda s, u, w, info, rng: alg.server_update(
      s, u, info.valid.astype(jnp.float32), info, rng))
  private = dp.private(alg, noise_multiplier=0.0, clip_norm=math.inf, expected_cohort=5)
  out = []
  for a in (uniform, private):
    st = init_state(a, exp.sampler, exp.data.num_clients, seed=0, mesh=exp.mesh)
    st, m = make_round(a, exp.sampler, seed=0, mesh=exp.mesh, chunk_size=2,
                       rounds_per_call=3)(st, exp.data.train)
    out.append(st)
  ref, got = out
  for x, y in zip(jax.tree.leaves(ref.server), jax.tree.leaves(got.server.inner)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The clients' sizes differ, so uniform weighting is not FedAdam's example weighting.
  assert len(set(np.asarray(exp.data.train.num_examples).tolist())) > 1


def test_clipped_deltas_have_norm_at_most_c(tiny_fedavg):
  exp, clip = tiny_fedavg, 0.3
  private = dp.private(exp.algorithm, noise_multiplier=1.0, clip_norm=clip, expected_cohort=5)
  server = private.init(jax.random.PRNGKey(0))
  ids = jnp.arange(12)
  data = jax.tree.map(lambda a: a[ids], exp.data.train)
  infos = ClientInfo(ids, jnp.zeros(12, jnp.int32), jnp.ones(12, bool))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1), i))(ids)
  up, _, metrics = jax.jit(jax.vmap(private.client_update, in_axes=(None, 0, 0, 0, 0)))(
      private.broadcast(server), (), data, keys, infos)
  norms = np.asarray(jax.vmap(optax.global_norm)(up.delta))
  raw = np.asarray(metrics["dp_update_norm"])  # the norm before clipping
  assert np.all(norms <= clip * (1 + 1e-6))
  assert np.any(raw > clip) and np.any(raw < clip)  # both cases occur
  np.testing.assert_allclose(norms, np.minimum(raw, clip), rtol=1e-5)
  np.testing.assert_array_equal(up.unclipped, (raw <= clip).astype(np.float32))


@pytest.mark.parametrize("adaptive", [False, True])
def test_noise_std_is_z_c_over_m(adaptive):
  """Zero deltas through FedAvg's server update (SGD, lr 1): the model moves by minus the
  noised mean, N(0, (z_Delta C / m)^2) per coordinate; 40 rounds' server keys x 2,000
  parameters."""
  z, clip, m, k, p = 1.3, 0.7, 4.0, 6, 2000
  private = dp.private(_fedavg_on(p), noise_multiplier=z, clip_norm=clip, expected_cohort=m,
                       adaptive=adaptive, clipped_count_stddev=1.0, clip_lr=0.0)
  server = private.init(jax.random.PRNGKey(0))
  uploads = DPUpload({"w": jnp.zeros((k, p))}, jnp.ones(k))
  info = ServerInfo(jnp.int32(0), jnp.arange(k), jnp.ones(k, jnp.int32), jnp.ones(k, bool))

  def step(r):
    new, _ = private.server_update(server, uploads, jnp.ones(k), info,
                                   seeding.round_subkeys(0, r)[2])
    return new.inner.params["w"] - server.inner.params["w"]

  moved = np.asarray(jax.jit(jax.vmap(step))(jnp.arange(40))).ravel()
  z_delta = (z ** -2 - 2.0 ** -2) ** -0.5 if adaptive else z
  target = z_delta * clip / m
  n = moved.size
  se = target / math.sqrt(2 * n)
  assert abs(moved.std() - target) < 3 * se, (moved.std(), target, se)
  assert abs(moved.mean()) < 3 * target / math.sqrt(n)
  assert z_delta == pytest.approx(dp.delta_noise_multiplier(z, adaptive, 1.0))


def test_adaptive_clipping_follows_the_geometric_update_and_tracks_the_quantile():
  """Andrew et al. (arXiv 1905.03871), Algorithm 1 with sigma_b = 0: C <- C exp(-eta (b - gamma))
  where b is the fraction of clients with ||Delta|| <= C; fixed update norms (lognormal) for 64
  clients, 300 rounds, gamma = 0.3: C ends near the norms' 0.3 quantile."""
  k, gamma, eta, c0 = 64, 0.3, 0.2, 0.05
  norms = np.exp(np.random.default_rng(0).normal(0.0, 0.5, k)).astype(np.float32)
  direction = np.random.default_rng(1).normal(size=(k, 3)).astype(np.float32)
  deltas = direction / np.linalg.norm(direction, axis=1, keepdims=True) * norms[:, None]
  base = _fedavg_on(3)._replace(server_update=lambda s, u, w, i, r: (s, {}))
  private = dp.private(base, noise_multiplier=0.0, clip_norm=c0, expected_cohort=k,
                       adaptive=True, target_quantile=gamma, clip_lr=eta,
                       clipped_count_stddev=0.0)
  info = ServerInfo(jnp.int32(0), jnp.arange(k), jnp.ones(k, jnp.int32), jnp.ones(k, bool))

  def step(state, _):
    up = jax.vmap(lambda d: dp.clip_by_norm(d, state.clip_norm))(jnp.asarray(deltas))
    uploads = DPUpload(up[0], (up[1] <= state.clip_norm).astype(jnp.float32))
    new, _ = private.server_update(state, uploads, jnp.ones(k), info, jax.random.PRNGKey(0))
    return new, new.clip_norm

  state = private.init(jax.random.PRNGKey(0))
  _, clips = jax.lax.scan(step, state, None, length=300)
  clips = np.asarray(clips, np.float64)
  c, ref = c0, []  # NumPy restatement
  for _ in range(300):
    c = c * math.exp(-eta * (np.mean(norms <= c) - gamma))
    ref.append(c)
  np.testing.assert_allclose(clips, ref, rtol=1e-4)
  assert np.mean(norms <= clips[-1]) == pytest.approx(gamma, abs=2.0 / k)


def test_dp_round_equals_reference_loop():
  cfg = dp_config(rounds_per_call=1)
  exp = _experiment(cfg)
  alg, smp = exp.algorithm, exp.sampler
  fn = make_round(alg, smp, seed=0, mesh=exp.mesh, chunk_size=2)
  ref = make_reference_round(alg, smp, seed=0, sort_by_size=True)
  a = init_state(alg, smp, exp.data.num_clients, seed=0, mesh=exp.mesh)
  b = init_state(alg, smp, exp.data.num_clients, seed=0, mesh=exp.mesh)
  cohorts = []
  for _ in range(3):
    ids, _ = smp.sample(seeding.round_subkeys(0, a.round)[0], a.round, a.sampler)
    cohorts.append(int(np.sum(np.asarray(ids) >= 0)))
    a, m = fn(a, exp.data.train)
    b, _ = ref(b, exp.data.train)
    assert float(m["server/dp_cohort"][0]) == cohorts[-1]
    for x, y in zip(jax.tree.leaves((a.server, a.sampler)), jax.tree.leaves((b.server,
                                                                               b.sampler))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  assert len(set(cohorts)) > 1, cohorts  # the cohort size varied
  assert float(a.server.clip_norm) != cfg.dp.clip_norm  # adaptive clipping moved C


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import tqdm.auto
from fedjax_sim import checkpoint
from fedjax_sim.launch.experiment import train_and_evaluate
from test_dp import dp_config
saved, done = [], [0]
save, update = checkpoint.Checkpointer.save, tqdm.auto.tqdm.update
def save_and_keep(self, r, state):
  saved.append(self)
  save(self, r, state)
def update_or_die(self, n=1):  # the loop's last step of a call, after checkpoint and evaluation
  done[0] += n
  if done[0] == 2:
    saved[-1].wait()
    os.kill(os.getpid(), signal.SIGKILL)
  return update(self, n)
checkpoint.Checkpointer.save = save_and_keep
tqdm.auto.tqdm.update = update_or_die
train_and_evaluate(dp_config(), {workdir!r})
"""


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _KILLED_RUN.format(tests=TESTS, workdir=part)],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  train_and_evaluate(dp_config(), part, resume=True)
  train_and_evaluate(dp_config(), full)
  rows = [[json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] for d in (full, part)]
  assert [r["round"] for r in rows[0]] == [r["round"] for r in rows[1]] == [0, 2, 4]
  for x, y in zip(*rows):
    for key in ("test_accuracy", "test_loss", "dp_epsilon", "dp_clip_norm", "server/dp_cohort"):
      assert x.get(key) == y.get(key), key
  # The logged epsilon is dp_accounting's, computed here from the config: q = 5/12, z = 1,
  # 4 rounds, delta = 12^-1.1 (RDP, Poisson).
  import dp_accounting
  direct = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.PoissonSampledDpEvent(
      5 / 12, dp_accounting.GaussianDpEvent(1.0)), 4).get_epsilon(12 ** -1.1)
  assert rows[0][-1]["dp_epsilon"] == pytest.approx(direct, rel=1e-9)
  # Communication counts the expected cohort q C = 5 per round, not the padded bound K_max = 8.
  from fedjax_sim import comm
  exp = _experiment(dp_config())
  per_client = comm.round_comm(exp.algorithm, exp.data.train, 1)["upload_scalars"]
  assert rows[0][-1]["comm/upload_scalars_per_round"] == 5 * per_client
  # A vectorized sweep over seeds logs the same privacy fields per point (seed 0 = this run).
  from fedjax_sim.launch import sweep as sw
  points = sw.make_points(dp_config(), {}, seeds=[0, 1])
  res = sw.run_sweep(dp_config(), points, str(tmp_path / "grid"), log=lambda m: None)
  assert [r["mode"] for r in res] == ["vectorized[2]"] * 2, res
  grid = [json.loads(l) for l in open(os.path.join(tmp_path, "grid", points[0].name,
                                                   "metrics.jsonl"))]
  for x, y in zip(rows[0], grid):
    for key in ("dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_truncated_rounds",
                "comm/upload_scalars_per_round"):
      assert x[key] == y[key], key
    assert x["dp_clip_norm"] == pytest.approx(y["dp_clip_norm"], rel=1e-5)
  from fedjax_sim.checkpoint import Checkpointer
  states = []
  for d in (full, part):
    ck = Checkpointer(os.path.join(d, "checkpoints"), 3)
    states.append(ck.restore(init_state(exp.algorithm, exp.sampler, exp.data.num_clients, 0,
                                        exp.mesh)))
    ck.close()
  for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_poisson_sampler_rate_empty_slots_and_truncation():
  c, q = 50, 0.1
  smp = sampling.poisson(c, q)
  assert smp.rate == q and smp.expected_cohort == pytest.approx(5.0)
  assert smp.clients_per_round == sampling.poisson_bound(c, q)
  from scipy import stats
  assert stats.binom.sf(smp.clients_per_round, c, q) <= sampling.POISSON_TAIL
  rounds = 400
  freq = sampling.participation_frequencies(smp, rounds, seed=0)
  # Each client's count is Binomial(400, 0.1): mean 40, sd 6; the average over 50 clients
  # is within 3 standard errors of q.
  assert abs(freq.mean() - q) < 3 * math.sqrt(q * (1 - q) / (rounds * c))
  ids, state = jax.jit(smp.sample)(jax.random.PRNGKey(3), jnp.int32(0), smp.init())
  ids = np.asarray(ids)
  real = ids[ids >= 0]
  assert len(set(real.tolist())) == real.size and np.all(ids[real.size:] == -1)
  assert int(state) == 0
  tight = sampling.poisson(c, 0.5, bound=3)  # ~25 drawn, 3 kept: truncated every round
  ids, state = tight.sample(jax.random.PRNGKey(0), jnp.int32(0), tight.init())
  assert np.all(np.asarray(ids) >= 0) and int(state) == 1
  with pytest.raises(ValueError, match="stream"):
    make_round(_fedavg_on(3), smp, seed=0, schedule="stream")


def test_dp_round_streams_as_it_chunks():
  """The wrapper keeps the step form (LocalSpec, clipping in ``finish``), so a fixed-size DP
  cohort runs under the streaming schedule (what ``schedule=auto`` picks for it): equal to the
  chunked schedule on one device."""
  from fedjax_sim.round import make_mesh
  cfg = tiny_config()
  cfg.data.num_clients, cfg.model_kwargs.hidden = 12, (16,)
  cfg.dp.update(dict(enabled=True, noise_multiplier=1.0, clip_norm=0.3, adaptive=True,
                     clipped_count_stddev=1.0))
  exp, one = _experiment(cfg), make_mesh(1)
  assert exp.algorithm.local is not None
  out = []
  for schedule in ("chunked", "stream"):
    st = init_state(exp.algorithm, exp.sampler, 12, seed=0, mesh=one)
    st, _ = make_round(exp.algorithm, exp.sampler, seed=0, mesh=one, schedule=schedule,
                       slots=3)(st, exp.data.train)
    out.append(st.server)
  for x, y in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert float(out[1].clip_norm) != 0.3  # adaptive clipping ran
