"""CoFED (docs/decisions.md#cofed), registered as cofed_cotrain: the vote table and the
pseudo-labelling step against a NumPy statement of the rule, and the round (the server's pseudo
labels are those of the users' trained models; the term trains on the kept ones)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sim.algorithms import cofed as cf
from fedjax_sim.algorithms import fedmuscle as fm
from fedjax_sim.data import build_multitask_digits
from fedjax_sim.data.multitask import TASK_NAMES, task_tables
from fedjax_sim.round import init_state, make_mesh, make_round

LABEL_MAP, TASK_CLASSES = task_tables()


def _np_vote(label_map, s, c, t, rule):
  """The class of task t that task s's class c votes for, or None: same task -> itself;
  'refines' -> the t-label shared by every digit that s labels c, if they share one."""
  if s == t:
    return c
  if rule == "same_task":
    return None
  image = {int(label_map[t][y]) for y in range(label_map.shape[1]) if label_map[s][y] == c}
  return image.pop() if len(image) == 1 else None


def _np_pseudo_labels(preds, uploaded, tasks, rule, agreement):
  """The rule, one user and example at a time: the other uploaders' votes, mapped to u's task;
  the most voted class (smallest on ties) if its votes exceed agreement x all votes."""
  num_users, b = preds.shape
  out = np.full((num_users, b), -1)
  for u, i in itertools.product(range(num_users), range(b)):
    votes = [_np_vote(LABEL_MAP, tasks[v], preds[v, i], tasks[u], rule)
             for v in range(num_users) if v != u and uploaded[v]]
    votes = [x for x in votes if x is not None]
    if votes:
      counts = np.bincount(votes, minlength=10)
      if counts.max() > agreement * len(votes):
        out[u, i] = int(np.argmax(counts))
  return out


def test_vote_table():
  same = cf.vote_table(LABEL_MAP, TASK_CLASSES, "same_task")
  refines = cf.vote_table(LABEL_MAP, TASK_CLASSES, "refines")
  digit10, parity, gt4, mod3 = (TASK_NAMES.index(n) for n in ("digit10", "parity", "gt4", "mod3"))
  for s, t, c in itertools.product(range(4), range(4), range(10)):
    want = _np_vote(LABEL_MAP, s, c, t, "refines") if c < TASK_CLASSES[s] else None
    assert refines[s, c, t] == (-1 if want is None else want)
    assert same[s, c, t] == (c if s == t and c < TASK_CLASSES[s] else -1)
  np.testing.assert_array_equal(refines[digit10, :, parity], np.arange(10) % 2)
  np.testing.assert_array_equal(refines[digit10, :, gt4], np.arange(10) > 4)
  assert np.all(refines[parity, :, mod3] == -1) and np.all(refines[mod3, :, gt4] == -1)
  with pytest.raises(ValueError, match="needs the tasks' label maps"):
    cf.vote_table(None, TASK_CLASSES, "refines")
  with pytest.raises(ValueError, match="label_rule='vote'"):
    cf.vote_table(LABEL_MAP, TASK_CLASSES, "vote")


@pytest.mark.parametrize("rule", cf.LABEL_RULES)
@pytest.mark.parametrize("agreement", [0.0, 0.5, 0.7])
def test_pseudo_labels_match_numpy(rule, agreement):
  rng = np.random.default_rng(int(agreement * 10) + len(rule))
  num_users, b = 9, 16
  tasks = rng.integers(0, 4, num_users)
  # Predictions concentrated on few classes, so votes agree and disagree both.
  preds = np.stack([rng.integers(0, min(TASK_CLASSES[t], 3), b) for t in tasks])
  uploaded = rng.random(num_users) < 0.8
  votes = cf.vote_table(LABEL_MAP, TASK_CLASSES, rule)
  got = cf.pseudo_labels(jnp.asarray(preds, jnp.int32), jnp.asarray(uploaded),
                         jnp.asarray(tasks, jnp.int32), jnp.asarray(votes), agreement)
  want = _np_pseudo_labels(preds, uploaded, tasks, rule, agreement)
  np.testing.assert_array_equal(got, want)
  assert np.any(want >= 0) and np.any(want < 0)  # both outcomes exercised


def test_pseudo_labels_ties_and_self_votes():
  """Two same-task voters that disagree: no label at 0.5 (a tie is no strict majority), the
  smaller class at 0.0; a user's own prediction never votes for itself."""
  votes = jnp.asarray(cf.vote_table(LABEL_MAP, TASK_CLASSES, "same_task"))
  tasks = jnp.zeros(3, jnp.int32)
  preds = jnp.array([[7], [4], [2]], jnp.int32)
  up = jnp.ones(3, bool)
  np.testing.assert_array_equal(cf.pseudo_labels(preds, up, tasks, votes, 0.5), [[-1]] * 3)
  np.testing.assert_array_equal(cf.pseudo_labels(preds, up, tasks, votes, 0.0), [[2], [2], [4]])
  alone = cf.pseudo_labels(preds, jnp.array([True, False, False]), tasks, votes, 0.0)
  np.testing.assert_array_equal(alone, [[-1], [7], [7]])


def test_round_labels_the_next_batch_and_trains_on_it():
  """Round t's server pseudo labels are the rule applied to the users' trained models'
  predictions on round t+1's public batch; from round 1 each user's term is the masked CE of
  its kept labels."""
  d = build_multitask_digits(num_clients=4, examples_per_user=10, public_per_class=2, seed=0,
                             tasks=("digit10", "parity"))
  kw = dict(public_batch=8, proj_dim=4, client_lr=0.05, client_momentum=0.9, batch_size=10)
  alg = cf.cofed_cotrain(("mlp_s",), d.aux["tasks"], d.aux["public_x"],
                         input_shape=d.input_shape, task_classes=d.aux["task_classes"],
                         task_label_map=d.aux["task_label_map"], label_rule="refines",
                         agreement=0.0, **kw)
  mesh = make_mesh(1)
  state = fm.with_tasks(init_state(alg, None, 4, seed=0, mesh=mesh), alg, d.aux["tasks"])
  round_fn = make_round(alg, seed=0, mesh=mesh, rounds_per_call=1, donate=False)
  s1, m1 = round_fn(state, d.train)
  s2, m2 = round_fn(s1, d.train)
  um = fm.user_model("mlp_s", d.input_shape, 4, 10)
  bias = fm.task_bias(d.aux["task_classes"], 10)
  tasks = np.asarray(d.aux["tasks"])
  x1 = np.asarray(d.aux["public_x"])[np.asarray(fm.public_batch_indices(
      s1.server.key, jnp.int32(1), len(d.aux["public_x"]), 8))]
  params = lambda s, u: jax.tree.map(lambda a: a[u], s.clients[0].params)
  preds = np.stack([np.argmax(np.asarray(um.logits(params(s1, u), x1)) + bias[tasks[u]], -1)
                    for u in range(4)])
  want = _np_pseudo_labels(preds, np.ones(4, bool), tasks, "refines", 0.0)
  np.testing.assert_array_equal(s1.server.term, want)
  assert int(s1.server.ready_round) == 1 and float(m1["aligned"][0]) == 0.0
  # digit10 users (0, 2) get labels from each other only; parity users from everyone.
  assert np.all(want[[1, 3]] >= 0) and np.all(want[[0, 2]] >= 0)
  np.testing.assert_array_equal(want[0], preds[2])
  assert float(m2["aligned"][0]) == 1.0 and float(m2["align_loss"][0]) > 0


def test_registry_builder_and_knob_checks():
  from fedjax_sim.algorithms import registry
  from fedjax_sim.errors import ConfigError
  from fedjax_sim.launch.configs.fedmuscle_digits import get_config
  assert registry.knob_defaults("cofed_cotrain") == {
      "pseudo_weight": 1.0, "agreement": 0.5, "label_rule": "same_task", "public_batch": 32,
      "proj_dim": 32}
  cfg = get_config("smoke")
  cfg.archs = ("mlp_s", "mlp_m")
  d = build_multitask_digits(num_clients=4, examples_per_user=10, public_per_class=2)
  spec = registry.DataSpec(d.input_shape, d.num_classes, d.num_clients)
  ctx = registry.BuildContext.from_config(cfg, spec, data=d)
  alg = registry.build("cofed_cotrain", ctx, {"public_batch": 4, "label_rule": "refines"})
  assert alg.name == "cofed_cotrain" and alg.evaluate is not None
  for knobs, match in (({"agreement": 1.0}, "agreement=1.0"),
                       ({"pseudo_weight": -1.0}, "pseudo_weight=-1.0")):
    with pytest.raises(ValueError, match=match):
      registry.build("cofed_cotrain", ctx, knobs)
  with pytest.raises(ConfigError, match="no knob task_label_map"):
    registry.build("cofed_cotrain", ctx, {"task_label_map": None})


def test_fedmuscle_driver_builds_both_baselines():
  """The FedMuscle report's driver builds FedHeNN and CoFED on its users (knobs cfg.<method>)."""
  from fedjax_sim.launch.configs.fedmuscle_digits import get_config
  from fedjax_sim.launch.experiments import fedmuscle_digits as driver
  cfg = get_config("smoke")
  cfg.archs = ("mlp_s", "mlp_m")
  cfg.fedhenn = {"public_batch": 4}
  cfg.cofed_cotrain = {"label_rule": "refines", "public_batch": 4}
  d = build_multitask_digits(num_clients=4, examples_per_user=10, public_per_class=2)
  for name in ("fedhenn", "cofed_cotrain"):
    alg = driver.baseline(name, cfg, d)
    assert alg.name == name and [len(p.client_ids) for p in alg.pools] == [2, 2]
  assert alg.init(jax.random.PRNGKey(0)).term.shape == (4, 4)  # B = 4 from cfg.cofed_cotrain
