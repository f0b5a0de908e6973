"""Cohort samplers: pure functions of (key, round, sampler state).

A sampler is a NamedTuple ``(init, sample)``: ``init() -> state`` and
``sample(key, round, state) -> (client_ids int32 [K], state)``. The key is
``fold_in(seed_key, round)``-derived by the round builder, so the cohort is a
pure function of (seed, round) and a resumed run draws the same cohorts.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class Sampler(NamedTuple):
  init: Callable[[], Any]
  sample: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
  num_clients: int
  clients_per_round: int


def check_cohort(num_clients: int, clients_per_round: int) -> None:
  if clients_per_round < 1 or clients_per_round > num_clients:
    raise ValueError(
        f"clients_per_round={clients_per_round} must be in [1, num_clients={num_clients}]; set "
        "--config.clients_per_round (or raise --config.data.num_clients).")


def uniform(num_clients: int, clients_per_round: int) -> Sampler:
  """K clients uniformly without replacement each round."""
  check_cohort(num_clients, clients_per_round)

  def sample(key, round, state):
    del round
    ids = jax.random.choice(key, num_clients, (clients_per_round,), replace=False)
    return ids.astype(jnp.int32), state

  return Sampler(lambda: (), sample, num_clients, clients_per_round)


def build_sampler(cfg, num_clients: int) -> Sampler:
  """The sampler named by ``cfg.sampler`` (default ``uniform``).

  Raises:
    ValueError: unknown sampler name or bad cohort size.
  """
  name = cfg.get("sampler", "uniform") if hasattr(cfg, "get") else "uniform"
  if name == "uniform":
    return uniform(num_clients, cfg.clients_per_round)
  raise ValueError(f"Unknown sampler '{name}'; set --config.sampler to one of: uniform.")
