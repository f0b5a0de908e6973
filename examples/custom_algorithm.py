"""A custom algorithm: FedAvg whose server update clips each client's pseudo-gradient
to a maximum norm before averaging (a common robustness tweak), written against
the FederatedAlgorithm protocol and run on digits.

  .venv/bin/python examples/custom_algorithm.py
"""
import os

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import FederatedAlgorithm, init_state, make_round, tree_weighted_mean
from fedjax_sim.algorithms import fedavg
from fedjax_sim.launch.configs.base import get_base_config
from fedjax_sim.launch.experiment import build_experiment

SMOKE = bool(os.environ.get("FEDJAX_SIM_EXAMPLE_SMOKE"))


def clipped_fedavg(base: FederatedAlgorithm, max_norm: float) -> FederatedAlgorithm:
  """Reuses FedAvg's client update; replaces the server update."""
  def server_update(state, deltas, weights, info, rng):
    norms = jax.vmap(optax.global_norm)(deltas)                      # [K]
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-12))   # [K]
    clipped = jax.tree.map(lambda d: d * scale.reshape(-1, *[1] * (d.ndim - 1)), deltas)
    params = jax.tree.map(lambda p, d: p - d, state.params, tree_weighted_mean(clipped, weights))
    return state._replace(params=params), {"clipped_fraction": jnp.mean(norms > max_norm)}
  return base._replace(name="clipped_fedavg", server_update=server_update)


cfg = get_base_config()
exp = build_experiment(cfg)
alg = clipped_fedavg(fedavg(exp.algorithm.apply_fn, lambda r: exp.algorithm.init(r).params,
                            client_lr=0.1, batch_size=10), max_norm=1.0)
state = init_state(alg, exp.sampler, exp.data.num_clients, seed=0, mesh=exp.mesh)
round_fn = make_round(alg, exp.sampler, seed=0, mesh=exp.mesh, rounds_per_call=10)
for _ in range(1 if SMOKE else 10):
  state, metrics = round_fn(state, exp.data.train)
acc = float(jnp.mean(jnp.argmax(alg.apply_fn(state.server.params, exp.data.test_x), -1)
                     == exp.data.test_y))
print(f"clipped FedAvg, {int(state.round)} rounds: test accuracy {acc:.3f}, "
      f"clipped fraction (last round) {float(metrics['server/clipped_fraction'][-1]):.2f}")
