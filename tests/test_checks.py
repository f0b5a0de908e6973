"""check_algorithm: contract violations and errors raised while tracing become
AlgorithmError naming the function and the fix; our own errors pass through."""
import pytest

from conftest import tiny_config
from fedjax_sim.checks import AlgorithmError, check_algorithm
from fedjax_sim.errors import ConfigError
from fedjax_sim.round import init_state
from fedjax_sim.launch.experiment import build_experiment


@pytest.fixture(scope="module")
def fedavg():
  cfg = tiny_config()
  exp = build_experiment(cfg)
  state = init_state(exp.algorithm, exp.sampler, cfg.data.num_clients, seed=0, mesh=exp.mesh)
  return exp, state


def test_fedavg_passes(fedavg):
  exp, state = fedavg
  check_algorithm(exp.algorithm, state, exp.data.train)


def _raising(error):
  def fn(*args):
    raise error
  return fn


def test_value_error_in_client_update_is_an_algorithm_error(fedavg):
  exp, state = fedavg
  bad = exp.algorithm._replace(
      client_update=_raising(ValueError("rows must be a multiple of 7.\nsecond line")))
  with pytest.raises(AlgorithmError, match=r"client_update of 'fedavg' raised ValueError.*"
                     r"multiple of 7\. Fix the data") as err:
    check_algorithm(bad, state, exp.data.train)
  assert "second line" not in str(err.value)  # first line only; the whole error is chained
  assert isinstance(err.value.__cause__, ValueError)


def test_type_error_in_server_update_names_clients_per_round(fedavg):
  exp, state = fedavg
  bad = exp.algorithm._replace(server_update=_raising(TypeError("expected 5 uploads")))
  with pytest.raises(AlgorithmError, match=r"server_update of 'fedavg' raised TypeError when "
                     r"traced with a cohort of 3 slots .*clients_per_round=3\): expected 5"):
    check_algorithm(bad, state, exp.data.train, clients_per_round=3)


def test_our_own_errors_pass_through_unwrapped(fedavg):
  exp, state = fedavg
  bad = exp.algorithm._replace(server_update=_raising(ConfigError("set foo.bar to a positive value")))
  with pytest.raises(ConfigError, match="foo.bar") as err:
    check_algorithm(bad, state, exp.data.train)
  assert not isinstance(err.value, AlgorithmError)


def test_value_dependent_python_branch_is_caught(fedavg):
  exp, state = fedavg
  inner = exp.algorithm.client_update

  def client_update(b, cs, data, rng, info):
    if data.num_examples > 3:  # a Python bool of a traced value
      pass
    return inner(b, cs, data, rng, info)

  bad = exp.algorithm._replace(client_update=client_update)
  with pytest.raises(AlgorithmError, match="jnp.where / lax.cond"):
    check_algorithm(bad, state, exp.data.train)
