"""Privacy accounting (fedjax_sim/privacy.py) and its wiring from a run config.

* The epsilon a run logs (``launch.experiment.dp_fields``, the rows of metrics.jsonl) equals
  dp_accounting's direct computation of the same event, written out here from the config's
  numbers (q = K / C, delta = C^-1.1, the neighbouring relation of the sampling);
* a calibrated noise multiplier reproduces the target epsilon within 1%;
* what the accountant cannot analyse is refused with one line naming the fix.
"""
import math
from typing import Any, NamedTuple

import dp_accounting
import jax.numpy as jnp
import pytest
from dp_accounting import pld, rdp

from conftest import tiny_config
from fedjax_sim import privacy, sampling
from fedjax_sim.errors import ConfigError
from fedjax_sim.launch.experiment import dp_fields, privacy_spec, validate_config

REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


class _State(NamedTuple):  # what dp_fields reads of a SimState
  server: Any
  sampler: Any


class _Server(NamedTuple):
  clip_norm: Any


def _cfg(sampler="poisson", accountant="rdp", bound=0, z=1.3):
  c = tiny_config(sampler=sampler, cohort_bound=bound)  # C = 20, K = 5
  c.dp.update(dict(enabled=True, noise_multiplier=z, accountant=accountant))
  return c


def _direct(kind: str, rounds: int, z=1.3, c=20, k=5, bound=8, delta=None) -> float:
  """dp_accounting on the event, from scratch (delta default C^-1.1)."""
  delta = c ** -1.1 if delta is None else delta
  if kind == "poisson_rdp":
    acc = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(k / c, dp_accounting.GaussianDpEvent(z))
  elif kind == "fixed_rdp":  # replace-one: the clipped sum moves by 2C
    acc = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        c, k, dp_accounting.GaussianDpEvent(z / 2))
  else:  # poisson_pld with a truncating bound
    acc = pld.PLDAccountant()
    event = dp_accounting.TruncatedSubsampledGaussianDpEvent(c, k / c, bound, z)
  return acc.compose(event, rounds).get_epsilon(delta)


@pytest.mark.parametrize("kind,sampler,accountant,bound", [
    ("poisson_rdp", "poisson", "rdp", 0), ("fixed_rdp", "uniform", "rdp", 0),
    ("poisson_pld", "poisson", "pld", 8)])
def test_logged_epsilon_equals_dp_accounting(kind, sampler, accountant, bound):
  cfg = _cfg(sampler, accountant, bound)
  smp = sampling.build_sampler(cfg, cfg.data.num_clients)
  fields = dp_fields(cfg, smp)
  state = _State(_Server(jnp.float32(0.7)), smp.init())
  row = fields(3, state)
  assert row["dp_epsilon"] == pytest.approx(_direct(kind, 3), rel=1e-9)
  assert fields(0, state)["dp_epsilon"] == 0.0
  assert row["dp_noise_multiplier"] == 1.3 and row["dp_clip_norm"] == pytest.approx(0.7)
  # delta is C^-1.1 (plus the truncation share, which only RDP with a bound < C has).
  assert row["dp_delta"] >= 20 ** -1.1 and row["dp_delta"] == pytest.approx(20 ** -1.1,
                                                                            rel=1e-6)


@pytest.mark.parametrize("sampling_kind", ["poisson", "fixed"])
def test_calibrated_noise_reproduces_the_target_epsilon(sampling_kind):
  spec = privacy.PrivacySpec(1.0, 100, sampling_kind, 20 if sampling_kind == "fixed" else 60,
                             0.2, 1e-3, "rdp")
  for target in ((2.0, 8.0) if sampling_kind == "poisson" else (2.0,)):
    z = privacy.calibrate(spec, target, 20)
    kind = f"{sampling_kind}_rdp"
    got = _direct(kind, 20, z=z, c=100, k=20, delta=1e-3)
    assert abs(got / target - 1) < 0.01, (z, got, target)


def test_config_target_epsilon_sets_the_noise_multiplier():
  from fedjax_sim.launch.experiment import build_algorithm
  from fedjax_sim.algorithms.registry import DataSpec
  cfg = _cfg()
  cfg.dp.target_epsilon, cfg.rounds = 4.0, 10
  build_algorithm(cfg, DataSpec((8, 8, 1), 10, 20))
  spec = privacy_spec(cfg, sampling.build_sampler(cfg, 20))
  assert spec.noise_multiplier == cfg.dp.noise_multiplier != 1.3
  assert privacy.epsilon(spec, 10) == pytest.approx(4.0, rel=0.01)


def test_what_cannot_be_analysed_is_refused_with_one_line():
  cfg = _cfg("uniform", "pld")
  with pytest.raises(privacy.PrivacyError, match="dp.accountant=rdp") as err:
    privacy_spec(cfg, sampling.build_sampler(cfg, 20))
  cfg = _cfg("availability")
  with pytest.raises(privacy.PrivacyError, match="sampler=poisson or uniform") as err2:
    privacy_spec(cfg, sampling.build_sampler(cfg, 20))
  cfg = _cfg()
  cfg.algorithm = "scaffold"
  with pytest.raises(ConfigError, match="model delta.*--config.algorithm") as err3:
    validate_config(cfg)
  cfg = _cfg()
  cfg.dp.delta = 1.5
  with pytest.raises(ConfigError, match="dp.delta=1.5 must be in") as err4:
    validate_config(cfg)
  for e in (err, err2, err3, err4):
    assert "\n" not in str(e.value)
  spec = privacy.PrivacySpec(0.0, 20, "poisson", 8, 0.25, 1e-3)
  assert privacy.epsilon(spec, 5) == math.inf  # no noise: not private


def test_truncation_share_of_delta():
  """RDP analyses untruncated Poisson sampling; the default bound makes the difference tiny."""
  c, q = 100, 0.2
  spec = privacy.PrivacySpec(1.0, c, "poisson", sampling.poisson_bound(c, q), q, 1e-3, "rdp")
  extra = privacy.truncation_delta(spec, 4.0, 100)
  assert 0 < extra <= (1 + math.exp(4.0)) * 100 * sampling.POISSON_TAIL
  assert privacy.truncation_delta(spec._replace(accountant="pld"), 4.0, 100) == 0.0
  assert privacy.truncation_delta(spec._replace(cohort=c), 4.0, 100) == 0.0
  assert privacy.truncation_delta(spec, math.inf, 100) == 0.0  # no guarantee to adjust
