"""Cohort samplers: pure functions of (key, round, sampler state).

A sampler is a NamedTuple ``(init, sample)``: ``init() -> state`` and
``sample(key, round, state) -> (client_ids int32 [K], state)``. The key is
``fold_in(seed_key, round)``-derived by the round builder, so the cohort is a
pure function of (seed, round) and a resumed run draws the same cohorts.
Every sampler draws K distinct clients (without replacement), K fixed, except
``poisson``, whose cohort varies (at most K slots, empty ones -1).

Samplers (``cfg.sampler``):

* ``uniform``: K of C uniformly.
* ``availability``: unequal participation, as CoRe-Fed (arXiv 2602.00647)
  assumes. Client c has an availability a_c > 0 (drawn once, NumPy, from
  ``cfg.availability``: ``beta`` a_c ~ Beta(beta_a, beta_b), or ``power_law``
  a_c = r_c^(-power) with r_c a random permutation of 1..C); each round K
  clients are drawn without replacement with probability proportional to a_c
  (successive sampling, done in one shot by Gumbel top-k: argtop_K(log a_c +
  G_c), G_c iid Gumbel). Inclusion frequencies rise with a_c but saturate
  below 1, so the participation ratio between clients is smaller than the
  availability ratio; :func:`participation_frequencies` measures it.
* ``schedule``: a fixed table [R, K] of client ids, round r uses row r mod R.
  From a config, the table is R = ``availability.schedule_period`` draws of
  the availability sampler made once with NumPy, so a run replays the same
  unequal cohorts every R rounds.
* ``poisson``: Poisson sampling, as DP-FedAvg assumes (McMahan et al., arXiv
  1710.06963, Algorithm 1): each client joins independently with probability
  q, so the cohort size varies around the expected q*C. The sampler returns
  a fixed bound of K_max slots; unused slots hold id -1 (the round builder
  makes them zero-weight padding slots). From a config q = clients_per_round /
  C and K_max = ``cohort_bound`` (0: :func:`poisson_bound`). The only
  sampler with a variable cohort (``Sampler.rate`` is not None).

Axis legend: C clients, K clients per round, R schedule period.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import seeding


class Sampler(NamedTuple):
  """A cohort sampler.

  Attributes:
    init: ``() -> state``.
    sample: ``(key, round, state) -> (client_ids int32 [K], state)``; with
      ``rate`` set, empty slots hold -1.
    num_clients: C.
    clients_per_round: K (the fixed cohort size; with ``rate``, the bound K_max).
    rate: None for a fixed-size cohort; the Poisson sampling rate q
      (:func:`poisson`), expected cohort q*C.
  """
  init: Callable[[], Any]
  sample: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
  num_clients: int
  clients_per_round: int
  rate: Optional[float] = None

  @property
  def expected_cohort(self) -> float:
    """K for a fixed-size cohort, q*C for Poisson sampling."""
    return float(self.clients_per_round if self.rate is None else self.rate * self.num_clients)


def check_cohort(num_clients: int, clients_per_round: int) -> None:
  if clients_per_round < 1 or clients_per_round > num_clients:
    raise ValueError(
        f"clients_per_round={clients_per_round} must be in [1, num_clients={num_clients}] (the "
        "clients the data hold); set --config.clients_per_round, or give the data more clients "
        "(--config.data.num_clients for a partitioned dataset; a natural partition's files "
        "set its own count, see data.max_clients and data.min_client_size).")


def uniform(num_clients: int, clients_per_round: int) -> Sampler:
  """K clients uniformly without replacement each round."""
  check_cohort(num_clients, clients_per_round)

  def sample(key, round, state):
    del round
    ids = jax.random.choice(key, num_clients, (clients_per_round,), replace=False)
    return ids.astype(jnp.int32), state

  return Sampler(lambda: (), sample, num_clients, clients_per_round)


POISSON_TAIL = 1e-12  # P(a Poisson cohort exceeds the default bound), per round


def poisson_bound(num_clients: int, rate: float, tail: float = POISSON_TAIL) -> int:
  """The smallest K_max with P(Binomial(C, q) > K_max) <= ``tail`` (at least 1, at most C).

  The default bound of :func:`poisson`: a draw above it is truncated (see there).
  """
  from scipy import stats
  if rate >= 1.0:
    return num_clients
  k = int(stats.binom.isf(tail, num_clients, rate))
  while k < num_clients and stats.binom.sf(k, num_clients, rate) > tail:
    k += 1
  return int(min(max(k, 1), num_clients))


def poisson(num_clients: int, rate: float, bound: Optional[int] = None) -> Sampler:
  """Poisson sampling: each client joins a round independently with probability q = ``rate``.

  Client c is in round r's cohort iff u_c < q, u ~ U[0, 1)^C from the round's
  sampler key; the cohort (expected size q*C) is returned in K_max = ``bound``
  slots, the included clients first (in increasing u), the rest -1. In the
  rare round that draws more than K_max clients, the K_max with the smallest
  u are kept: a uniformly random subset (given inclusion, u is uniform on [0,
  q)), which is the truncated Poisson sampling that ``dp_accounting``'s
  ``TruncatedSubsampledGaussianDpEvent`` analyses (arXiv 2508.15089). The
  sampler's state, int32 [], counts the rounds so truncated.

  Args:
    num_clients: C.
    rate: q in (0, 1].
    bound: K_max in [1, C] (default :func:`poisson_bound`: truncation has probability
      <= 1e-12 per round).

  Raises:
    ValueError: q outside (0, 1] or K_max outside [1, C].
  """
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"Poisson sampling rate q={rate} must be in (0, 1]; set "
                     "--config.clients_per_round (the expected cohort q*C) in [1, num_clients].")
  bound = poisson_bound(num_clients, rate) if not bound else int(bound)
  if not 1 <= bound <= num_clients:
    raise ValueError(f"cohort_bound={bound} must be in [1, num_clients={num_clients}]; set "
                     "--config.cohort_bound (0 = automatic).")

  def sample(key, round, truncated):
    del round
    u = jax.random.uniform(key, (num_clients,), jnp.float32)
    neg_u, idx = jax.lax.top_k(-u, bound)  # the K_max smallest u, increasing
    ids = jnp.where(-neg_u < rate, idx, -1).astype(jnp.int32)
    over = jnp.sum(u < rate) > bound
    return ids, truncated + over.astype(jnp.int32)

  return Sampler(lambda: jnp.int32(0), sample, num_clients, bound, float(rate))


def availability_probs(num_clients: int, distribution: str = "power_law", *,
                       beta_a: float = 1.0, beta_b: float = 1.0, power: float = 1.0,
                       seed: int = 0) -> np.ndarray:
  """Per-client availabilities a (NumPy float64 [C], positive, sum 1).

  Args:
    distribution: ``beta`` (a_c ~ Beta(beta_a, beta_b) iid) or ``power_law``
      (a_c = r_c^(-power), r a random permutation of 1..C).
    seed: the population seed (``availability.seed``; a property of the
      client population, so it stays fixed across run seeds unless set). The
      draw uses its ``availability`` stream
      (``fedjax_sim.seeding.numpy_rng(seed, "availability")``).

  Raises:
    ValueError: unknown distribution or non-positive parameters.
  """
  rng = seeding.numpy_rng(seed, "availability")
  if distribution == "beta":
    if beta_a <= 0 or beta_b <= 0:
      raise ValueError(f"availability.beta_a={beta_a}, beta_b={beta_b} must be > 0.")
    a = rng.beta(beta_a, beta_b, num_clients)
  elif distribution == "power_law":
    if power < 0:
      raise ValueError(f"availability.power={power} must be >= 0 (0 = uniform).")
    a = (rng.permutation(num_clients) + 1.0) ** (-power)
  else:
    raise ValueError(f"Unknown availability distribution '{distribution}'; set "
                     "--config.availability.distribution to beta or power_law.")
  a = np.maximum(a, 1e-6)
  return a / a.sum()


def availability(probs, clients_per_round: int) -> Sampler:
  """K distinct clients per round, drawn with probability proportional to ``probs``.

  Args:
    probs: float [C] positive availabilities (normalization irrelevant).
    clients_per_round: K.

  Gumbel top-k over log(probs) equals successive sampling without replacement
  (Plackett-Luce; Kool et al. 2019, arXiv 1903.06059), i.e. what
  ``numpy.random.Generator.choice(C, K, replace=False, p=probs)`` draws.
  """
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 1 or np.any(~np.isfinite(probs)) or np.any(probs <= 0):
    raise ValueError("availability probabilities must be a 1-D array of positive numbers.")
  num_clients = probs.shape[0]
  check_cohort(num_clients, clients_per_round)
  logp = jnp.asarray(np.log(probs / probs.sum()), jnp.float32)

  def sample(key, round, state):
    del round
    g = jax.random.gumbel(key, (num_clients,), jnp.float32)
    _, ids = jax.lax.top_k(logp + g, clients_per_round)
    return ids.astype(jnp.int32), state

  return Sampler(lambda: (), sample, num_clients, clients_per_round)


def fixed_schedule(table, num_clients: int) -> Sampler:
  """Round r takes row r mod R of ``table`` (int [R, K], distinct ids per row)."""
  table = np.asarray(table)
  if table.ndim != 2 or table.shape[0] < 1:
    raise ValueError(f"schedule table must be [R, K] with R >= 1, got shape {table.shape}.")
  check_cohort(num_clients, table.shape[1])
  if table.min() < 0 or table.max() >= num_clients:
    raise ValueError(f"schedule ids must lie in [0, {num_clients}).")
  if any(len(set(row.tolist())) != len(row) for row in table):
    raise ValueError("a schedule row repeats a client; each round's cohort must be distinct.")
  tab = jnp.asarray(table, jnp.int32)

  def sample(key, round, state):
    del key
    return tab[round % tab.shape[0]], state

  return Sampler(lambda: (), sample, num_clients, table.shape[1])


def schedule_from_probs(probs, clients_per_round: int, period: int, seed: int = 0) -> np.ndarray:
  """A fixed [period, K] schedule: ``period`` NumPy draws proportional to ``probs``.

  Draws from ``seed``'s ``schedule`` stream (``fedjax_sim.seeding``), so it
  shares no bits with the availabilities drawn from the same seed.
  """
  probs = np.asarray(probs, np.float64)
  rng = seeding.numpy_rng(seed, "schedule")
  return np.stack([rng.choice(probs.size, clients_per_round, replace=False, p=probs / probs.sum())
                   for _ in range(period)]).astype(np.int32)


def participation_frequencies(sampler: Sampler, rounds: int, seed: int = 0) -> np.ndarray:
  """Fraction of ``rounds`` in which each client was sampled (NumPy float64 [C]).

  Uses the round builder's key convention (round r's sampler key is
  ``seeding.round_subkeys(seed, r)[0]``), so it counts what a run sees.
  """
  def one(state, r):
    k_sample = seeding.round_subkeys(seed, r)[0]
    ids, state = sampler.sample(k_sample, r, state)
    return state, ids

  _, ids = jax.jit(lambda s: jax.lax.scan(one, s, jnp.arange(rounds, dtype=jnp.int32)))(
      sampler.init())
  ids = np.asarray(ids).reshape(-1)
  counts = np.bincount(ids[ids >= 0], minlength=sampler.num_clients)  # poisson: -1 = empty
  return counts / rounds


def _avail_cfg(cfg) -> dict:
  a = cfg.get("availability", None) if hasattr(cfg, "get") else None
  get = (lambda k, d: a.get(k, d)) if a is not None else (lambda k, d: d)
  return dict(distribution=get("distribution", "power_law"), beta_a=get("beta_a", 1.0),
              beta_b=get("beta_b", 1.0), power=get("power", 1.0), seed=get("seed", 0),
              period=get("schedule_period", 50))


def build_sampler(cfg, num_clients: int) -> Sampler:
  """The sampler named by ``cfg.sampler`` (default ``uniform``).

  ``availability`` and ``schedule`` read ``cfg.availability`` (distribution,
  beta_a, beta_b, power, seed, schedule_period); ``poisson`` samples at rate q =
  ``clients_per_round`` / C into ``cohort_bound`` slots (0: :func:`poisson_bound`).

  Raises:
    ValueError: unknown sampler name or bad cohort size.
  """
  name = cfg.get("sampler", "uniform") if hasattr(cfg, "get") else "uniform"
  if name == "uniform":
    return uniform(num_clients, cfg.clients_per_round)
  if name == "poisson":
    check_cohort(num_clients, cfg.clients_per_round)
    return poisson(num_clients, cfg.clients_per_round / num_clients,
                   cfg.get("cohort_bound", 0) or None)
  if name in ("availability", "schedule"):
    a = _avail_cfg(cfg)
    probs = availability_probs(num_clients, a["distribution"], beta_a=a["beta_a"],
                               beta_b=a["beta_b"], power=a["power"], seed=a["seed"])
    if name == "availability":
      return availability(probs, cfg.clients_per_round)
    check_cohort(num_clients, cfg.clients_per_round)
    if a["period"] < 1:
      raise ValueError(f"availability.schedule_period={a['period']} must be >= 1.")
    return fixed_schedule(schedule_from_probs(probs, cfg.clients_per_round, a["period"],
                                              a["seed"]), num_clients)
  raise ValueError(f"Unknown sampler '{name}'; set --config.sampler to one of: uniform, "
                   "availability, schedule, poisson.")
