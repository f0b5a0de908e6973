"""Privacy accounting for client-level DP (:mod:`fedjax_sim.dp`) with Google's ``dp_accounting``.

One round of DP-FedAvg is a subsampled Gaussian mechanism on the clients: the
cohort is a sample of the C clients and the clipped sum gets noise with
multiplier z (std z C for sensitivity C). A run of R rounds is R
self-compositions. :func:`round_event` states the event for the sampling the
round actually does (:mod:`fedjax_sim.sampling`):

* ``poisson`` (each client joins with probability q; add/remove-one
  neighbours): ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``. When the
  cohort bound K_max < C can truncate a draw, the PLD accountant analyses the
  truncated sampler exactly (``TruncatedSubsampledGaussianDpEvent``, arXiv
  2508.15089); the RDP accountant analyses the untruncated one, whose epsilon
  then holds at delta + (1 + e^epsilon) R P(Binomial(C, q) > K_max)
  (:func:`truncation_delta`; the truncated and untruncated runs differ only
  on that event), about delta with the default bound (``sampling.poisson_bound``).
* ``fixed`` (K of C uniformly without replacement; replace-one neighbours,
  C public): ``SampledWithoutReplacementDpEvent(C, K, GaussianDpEvent(z / 2))``
  under the RDP accountant (Wang, Balle and Kasiviswanathan, arXiv 1808.00087,
  Theorem 27). Replacing a client moves the clipped sum by up to 2C, hence z / 2.
  dp_accounting's PLD accountant has no such event: refused.

z = 0 is a non-private event (epsilon = inf). :func:`calibrate` finds the
smallest z whose epsilon after R rounds is the target
(``dp_accounting.calibrate_dp_mechanism``). What this accounts for and what
it does not (e.g. hyperparameter tuning on the same clients) is stated in the
README's differential-privacy section.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

from fedjax_sim.errors import ConfigError

# dp_accounting is imported where it is used: it takes about a second to import (scipy), which
# every command line and worker would pay through launch.experiment even without DP.

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")


class PrivacyError(ConfigError):
  """The accountant cannot analyse this configuration (one line naming the fix)."""


class PrivacySpec(NamedTuple):
  """One round's mechanism and the accounting settings.

  Attributes:
    noise_multiplier: z >= 0 (with adaptive clipping, the combined z, see
      ``dp.delta_noise_multiplier``).
    num_clients: C, the population.
    sampling: ``poisson`` or ``fixed``.
    cohort: K (fixed) or the bound K_max (poisson).
    rate: q: the Poisson rate, or K / C.
    delta: the target delta in (0, 1).
    accountant: ``rdp`` or ``pld``.
  """
  noise_multiplier: float
  num_clients: int
  sampling: str
  cohort: int
  rate: float
  delta: float
  accountant: str = "rdp"


def check(spec: PrivacySpec) -> None:
  """Refuses, in one line, a configuration the accountant cannot analyse.

  Raises:
    PrivacyError: unknown accountant or sampling, fixed-size sampling under PLD,
      delta outside (0, 1), z < 0, or a rate outside (0, 1].
  """
  if spec.accountant not in ACCOUNTANTS:
    raise PrivacyError(f"unknown accountant '{spec.accountant}'; set --config.dp.accountant to "
                       f"one of {', '.join(ACCOUNTANTS)}.")
  if spec.sampling not in SAMPLINGS:
    raise PrivacyError(f"no accountant analyses sampling '{spec.sampling}'; use "
                       "--config.sampler=poisson or uniform.")
  if spec.sampling == "fixed" and spec.accountant == "pld":
    raise PrivacyError("dp.accountant=pld cannot analyse fixed-size sampling without "
                       "replacement (sampler=uniform); use --config.dp.accountant=rdp or "
                       "--config.sampler=poisson.")
  if not 0.0 < spec.delta < 1.0:
    raise PrivacyError(f"dp.delta={spec.delta} must be in (0, 1) (e.g. below 1/num_clients); "
                       "set --config.dp.delta.")
  if not spec.noise_multiplier >= 0:
    raise PrivacyError(f"dp.noise_multiplier={spec.noise_multiplier} must be >= 0.")
  if not 0.0 < spec.rate <= 1.0:
    raise PrivacyError(f"sampling rate q={spec.rate} must be in (0, 1]; set "
                       "--config.clients_per_round in [1, data.num_clients].")


def _relation(spec: PrivacySpec):
  import dp_accounting
  rel = dp_accounting.NeighboringRelation
  return rel.ADD_OR_REMOVE_ONE if spec.sampling == "poisson" else rel.REPLACE_ONE


def make_accountant(spec: PrivacySpec):
  """A fresh ``dp_accounting`` accountant of ``spec``'s kind and neighbouring relation."""
  from dp_accounting import pld, rdp
  if spec.accountant == "pld":
    return pld.PLDAccountant(_relation(spec))
  return rdp.RdpAccountant(neighboring_relation=_relation(spec))


def round_event(spec: PrivacySpec):
  """One round's ``dp_accounting.DpEvent`` (see the module docstring)."""
  import dp_accounting
  z = float(spec.noise_multiplier)
  if z == 0.0:
    return dp_accounting.NonPrivateDpEvent()
  if spec.sampling == "fixed":
    return dp_accounting.SampledWithoutReplacementDpEvent(
        spec.num_clients, spec.cohort, dp_accounting.GaussianDpEvent(z / 2.0))
  if spec.accountant == "pld" and spec.cohort < spec.num_clients:
    return dp_accounting.TruncatedSubsampledGaussianDpEvent(
        spec.num_clients, float(spec.rate), spec.cohort, z)
  return dp_accounting.PoissonSampledDpEvent(float(spec.rate), dp_accounting.GaussianDpEvent(z))


def run_event(spec: PrivacySpec, rounds: int):
  """R rounds: ``dp_accounting.SelfComposedDpEvent(round_event(spec), R)``."""
  import dp_accounting
  return dp_accounting.SelfComposedDpEvent(round_event(spec), int(rounds))


@functools.lru_cache(maxsize=256)
def epsilon(spec: PrivacySpec, rounds: int) -> float:
  """Epsilon at ``spec.delta`` after ``rounds`` rounds (0 for none; inf when z = 0).

  Raises:
    PrivacyError: see :func:`check`.
  """
  check(spec)
  if rounds <= 0:
    return 0.0
  if spec.noise_multiplier == 0:
    return math.inf
  acc = make_accountant(spec)
  with _quiet_absl():  # RDP logs each fractional order it drops (they do not bound epsilon)
    acc.compose(run_event(spec, rounds))
    return float(acc.get_epsilon(spec.delta))


@contextlib.contextmanager
def _quiet_absl():
  from absl import logging
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def truncation_delta(spec: PrivacySpec, eps: float, rounds: int) -> float:
  """What a truncating Poisson bound adds to delta when the event assumed no truncation.

  (1 + e^eps) R P(Binomial(C, q) > K_max) for RDP with K_max < C; 0 otherwise
  (fixed-size sampling, no possible truncation, or PLD, which analyses the
  truncated sampler itself).
  """
  if (spec.sampling != "poisson" or spec.accountant == "pld" or
      spec.cohort >= spec.num_clients or rounds <= 0 or not math.isfinite(eps)):
    return 0.0  # (epsilon = inf: no guarantee to adjust)
  from scipy import stats
  tail = float(stats.binom.sf(spec.cohort, spec.num_clients, spec.rate))
  return (1.0 + math.exp(min(eps, 700.0))) * rounds * tail


def calibrate(spec: PrivacySpec, target_epsilon: float, rounds: int) -> float:
  """The noise multiplier z whose epsilon after ``rounds`` rounds is ``target_epsilon``.

  Brent's method over z (``dp_accounting.calibrate_dp_mechanism``, tolerance
  1e-6 in z); the result's epsilon is within 1% of the target (tested). PLD
  searches between half and all of RDP's z for the untruncated event (RDP's
  epsilon bounds PLD's from above), since a PLD at a tiny z needs a huge grid.

  Raises:
    PrivacyError: see :func:`check`, or a target <= 0, or rounds < 1.
  """
  check(spec)
  if not target_epsilon > 0 or not math.isfinite(target_epsilon):
    raise PrivacyError(f"dp.target_epsilon={target_epsilon} must be a finite number > 0 "
                       "(0 = use dp.noise_multiplier).")
  if rounds < 1:
    raise PrivacyError(f"rounds={rounds}: calibrating needs at least one round.")
  import dp_accounting
  bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
  if spec.accountant == "pld":
    z_rdp = calibrate(spec._replace(accountant="rdp"), target_epsilon, rounds)
    bracket = dp_accounting.LowerEndpointAndGuess(z_rdp / 2.0, z_rdp)
  with _quiet_absl():
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(spec),
        lambda z: run_event(spec._replace(noise_multiplier=z), rounds),
        target_epsilon, spec.delta, bracket, tol=1e-6))
