"""FedOpt server optimizers against Reddi et al. (arXiv 2003.00295) Algorithm 2 in NumPy."""
import jax.numpy as jnp
import numpy as np

from fedjax_sim.algorithms.fedavg import server_optimizer


def _run(name, deltas, **kw):
  opt = server_optimizer(name, **kw)
  x = {"w": jnp.zeros(3)}
  state = opt.init(x)
  for d in deltas:  # the engine hands the optimizer x - x_clients as the "gradient"
    u, state = opt.update({"w": jnp.asarray(d)}, state, x)
    x = {"w": x["w"] + u["w"]}
  return np.asarray(x["w"])


def test_fedadagrad_matches_algorithm_2():
  rng = np.random.default_rng(0)
  deltas = [rng.normal(size=3).astype(np.float32) * 1e-3 for _ in range(4)]
  lr, tau = 0.1, 1e-3
  x, v = np.zeros(3), np.zeros(3)
  for d in deltas:
    v = v + d * d
    x = x - lr * d / (np.sqrt(v) + tau)  # Delta_t = -(pseudo-gradient)
  np.testing.assert_allclose(_run("adagrad", deltas, lr=lr, tau=tau), x, rtol=1e-5)


def test_sgd_with_lr_one_is_fedavg():
  deltas = [np.array([0.5, -1.0, 2.0], np.float32)]
  np.testing.assert_allclose(_run("sgd", deltas, lr=1.0), -deltas[0])
