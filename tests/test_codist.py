"""CODIST (algorithms/codist.py): loss vs NumPy, alpha = 0 == FedAdam per pool,
PERIODIC's schedule, teachers frozen, the server set disjoint from clients (data/server_sets.py),
and the registry builder on the data pipeline's server set."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim import seeding
from fedjax_sim.algorithms import registry
from fedjax_sim.algorithms.codist import codist, codistill, distill_loss, make_knobs
from fedjax_sim.algorithms.pooled import DataSpec, fedavg_per_pool, pool_cohort_sizes
from fedjax_sim.data import build_codist_data, build_federated_data
from fedjax_sim.errors import ConfigError
from fedjax_sim.round import SimState, init_state, make_mesh, make_round

KW = dict(client_lr=0.1, batch_size=10, epochs=1)
ADAM = optax.adam(3e-3, b1=0.9, b2=0.99, eps=1e-3)


def _np_kl(s, t, temp):
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lpt, lps = log_softmax(t / temp), log_softmax(s / temp)
  pt, ps = np.exp(lpt), np.exp(lps)
  loss = temp ** 2 * np.mean(np.sum(pt * (lpt - lps), -1))
  grad = temp * (ps - pt) / s.shape[0]  # d loss / d s
  return loss, grad


def test_distill_loss_and_gradient_match_numpy():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(3, 4)).astype(np.float32) * 2
  t = rng.normal(size=(3, 4)).astype(np.float32) * 2
  for temp in (1.0, 2.5):
    want_loss, want_grad = _np_kl(s.astype(np.float64), t.astype(np.float64), temp)
    loss, (gs, gt) = jax.value_and_grad(distill_loss, argnums=(0, 1))(s, t, temp)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(gs, want_grad, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(gt, 0.0)  # the teacher is a constant
  assert float(distill_loss(s, s, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_codistill_is_two_adam_runs_against_frozen_teachers():
  """Each direction equals optax.adam on KL(pre-distillation teacher || student)."""
  rng = np.random.default_rng(1)
  apply = lambda p, x: x @ p["w"] + p["b"]
  ps = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
  pl = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.ones(3)}
  x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  out_s, out_l, m = codistill(apply, apply, ps, pl, x, jax.random.PRNGKey(0), steps=3, lr=0.05,
                              temperature=2.0, batch_size=64)

  def ref(student, teacher):
    opt, t = optax.adam(0.05), apply(teacher, x)
    p, st = student, opt.init(student)
    for _ in range(3):
      g = jax.grad(lambda q: distill_loss(apply(q, x), t, 2.0))(p)
      u, st = opt.update(g, st, p)
      p = optax.apply_updates(p, u)
    return p

  for got, want in ((out_s, ref(ps, pl)), (out_l, ref(pl, ps))):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(m["kl_small"]) > 0 and float(m["kl_large"]) > 0


@pytest.fixture(scope="module")
def setup():
  """Data, the CODIST algorithm (MERGED, alpha = 0) and its compiled round (shared:
  every mode runs through this one executable, knobs live in the state)."""
  cd = build_codist_data(num_clients=20, large_fraction=0.3, server_size=40, seed=0)
  d = cd.fed
  spec = DataSpec(d.input_shape, d.num_classes, d.num_clients)
  ks = pool_cohort_sizes([len(cd.small_ids), len(cd.large_ids)], 8)
  alg = codist("mlp_s", "mlp_m", spec, large_ids=cd.large_ids, server_x=cd.server_sets["in"],
               mode="merged", alpha=0.0, distill_steps=2, distill_lr=0.1, k_small=ks[0],
               k_large=ks[1], server_opt=ADAM, **KW)
  mesh = make_mesh(1)
  round_fn = make_round(alg, seed=0, mesh=mesh, rounds_per_call=1, donate=False)
  return cd, spec, ks, alg, mesh, round_fn


def _with_knobs(state, knobs):
  return state._replace(server=state.server._replace(knobs=knobs))


def _assert_trees(a, b, exact=True):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:  # float32 rounding only: a few ulp
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-8)


def test_merged_alpha0_equals_two_fedadam_runs(setup):
  cd, spec, ks, alg, mesh, round_fn = setup
  ref = fedavg_per_pool(("mlp_s", "mlp_m"), spec, 8, server_opt=ADAM,
                        client_ids=[cd.small_ids, cd.large_ids], **KW)
  ref_fn = make_round(ref, seed=0, mesh=mesh, rounds_per_call=1, donate=False)
  merged = init_state(alg, None, spec.num_clients, seed=0, mesh=mesh)
  fedavg = _with_knobs(merged, make_knobs("fedavg"))
  two = SimState(merged.round, (merged.server.small, merged.server.large), merged.clients,
                 merged.sampler)
  for r in range(3):
    merged, m = round_fn(merged, cd.fed.train)
    fedavg, _ = round_fn(fedavg, cd.fed.train)
    two, _ = ref_fn(two, cd.fed.train)
    assert float(m["server/distill/distilled"][0]) == 1.0  # it did distill (and mix by 0)
    assert float(m["server/distill/kl_small"][0]) > 0
    # Same executable: MERGED with alpha = 0 is the FedAdam-only mode bit for bit.
    _assert_trees((merged.server.small, merged.server.large),
                  (fedavg.server.small, fedavg.server.large))
    # Against fedavg_per_pool (another program): bit for bit after round 0; XLA
    # fuses the bias vectors' FedAdam step differently in the two programs
    # (FMA contraction), so from round 1 on the FedAdam-only mode differs from
    # it by ~1 ulp too; hence a float32-rounding tolerance there.
    _assert_trees((merged.server.small, merged.server.large), two.server, exact=(r == 0))
  # alpha > 0 changes the models.
  mixed = _with_knobs(init_state(alg, None, spec.num_clients, seed=0, mesh=mesh),
                      make_knobs("merged", alpha=0.5, steps=2, lr=0.1))
  mixed, _ = round_fn(mixed, cd.fed.train)
  first = init_state(alg, None, spec.num_clients, seed=0, mesh=mesh)
  first, _ = round_fn(first, cd.fed.train)
  assert not np.allclose(mixed.server.small.params["Dense_0"]["kernel"],
                         first.server.small.params["Dense_0"]["kernel"])


def test_periodic_distills_only_when_round_mod_p_is_0(setup):
  cd, spec, ks, alg, mesh, round_fn = setup
  periodic = _with_knobs(init_state(alg, None, spec.num_clients, seed=0, mesh=mesh),
                         make_knobs("periodic", period=3, steps=2, lr=0.05))
  plain = make_knobs("fedavg")
  for r in range(5):
    # The same round from the same state with distillation switched off.
    fa, _ = round_fn(_with_knobs(periodic, plain), cd.fed.train)
    periodic, m = round_fn(periodic, cd.fed.train)
    distilled = r % 3 == 0
    assert float(m["server/distill/distilled"][0]) == float(distilled)
    assert (float(m["server/distill/kl_large"][0]) > 0) == distilled
    for ours, theirs in ((periodic.server.small, fa.server.small),
                         (periodic.server.large, fa.server.large)):
      same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours.params),
                                                   jax.tree.leaves(theirs.params))]
      assert all(same) != distilled, f"round {r}"
      _assert_trees(ours.opt_state, theirs.opt_state)  # distillation leaves FedAdam's moments


def _rows(x):
  return {np.asarray(r).tobytes() for r in np.asarray(x).reshape(len(x), -1)}


def test_server_sets_are_disjoint_from_client_data_and_domains_hold():
  cd = build_codist_data(num_clients=10, large_fraction=0.4, server_size=60, seed=3,
                         domain_classes=((0, 1, 2, 3), (4, 5, 6, 7)), ood_classes=(8, 9))
  tr, te = cd.fed.train, cd.fed.test
  client_rows = set()
  for data in (tr, te):
    m = np.asarray(data.mask)
    client_rows |= _rows(np.asarray(data.x)[m])
  for name, xs in cd.server_sets.items():
    assert len(xs) == 60
    assert not (_rows(xs) & client_rows), name
  from fedjax_sim.data import load_digits
  ds = load_digits()
  assert set(np.asarray(ds.train_y)[cd.server_idx["ood"]]) == {8, 9}
  assert set(np.asarray(ds.train_y)[cd.server_idx["in"]]) == set(range(8))
  y, m = np.asarray(tr.y), np.asarray(tr.mask)
  np.testing.assert_array_equal(cd.large_ids, [0, 1, 2, 3])
  assert set(y[:4][m[:4]]) <= {0, 1, 2, 3} and set(y[4:][m[4:]]) <= {4, 5, 6, 7}


def test_registry_builder_uses_the_pipeline_server_set():
  """--config.algorithm=codist: pools from --config.archs, the server set and keep mask from
  the data's aux (--config.data.server_size), high-capacity clients from the run seed."""
  from fedjax_sim.launch.configs.codist_digits import get_config
  cfg = get_config("smoke")
  cfg.data.num_clients, cfg.data.server_size, cfg.seed = 20, 50, 3
  data = build_federated_data(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed)
  spec = DataSpec(data.input_shape, data.num_classes, data.num_clients)
  ctx = registry.BuildContext.from_config(cfg, spec, data=data)
  alg = registry.build("codist", ctx, {**cfg.codist, "large_fraction": 0.25, "k_large": 9})
  small, large = alg.pools
  assert (small.name, large.name) == ("mlp_s", "mlp_l")
  want = np.sort(seeding.numpy_rng(3, "pools").permutation(20)[:5])
  np.testing.assert_array_equal(large.client_ids, want)
  assert (small.clients_per_round, large.clients_per_round) == (10, 5)  # K_large <= C_large
  state = alg.init(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(state.server_x, data.aux["server_x"])
  assert float(state.knobs.alpha) == pytest.approx(0.3)  # the config's, over the default 0.5
  cfg.archs = ("mlp_s", "mlp_m", "mlp_l")
  with pytest.raises(ConfigError, match="two models"):
    registry.build("codist", registry.BuildContext.from_config(cfg, spec, data=data), {})
  cfg.archs = ("mlp_s", "mlp_l")
  plain = build_federated_data(dict(cfg.data, server_size=0), batch_size=10, seed=0)
  with pytest.raises(ConfigError, match="--config.data.server_size"):
    registry.build("codist", registry.BuildContext.from_config(cfg, spec, data=plain), {})
  with pytest.raises(ValueError, match="large_fraction=0.0 must be in"):
    registry.build("codist", ctx, {"large_fraction": 0.0})
