"""Multi-host: 2 processes x 2 CPU devices (jax.distributed over Gloo on localhost)
equal 1 process x 4 devices, and the checkpoint they write reads back in 1 process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from fedjax_sim.checkpoint import Checkpointer
from fedjax_sim.round import init_state
from fedjax_sim.launch.experiment import build_experiment

ARGS = ["run", "--config.data.num_clients=20", "--config.clients_per_round=6",
        "--config.rounds=4", "--config.eval_every=2", "--config.checkpoint_every=2",
        "--config.rounds_per_call=2", "--config.model_kwargs.hidden=(32,)",
        "--config.progress=False"]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def test_two_processes_equal_one_process(tmp_path, small_config):
  exe = os.path.join(os.path.dirname(sys.executable), "fedjax-sim")
  one = subprocess.run([exe, *ARGS, f"--workdir={tmp_path}/one"], env=_env(4),
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(
      [exe, *ARGS, f"--workdir={tmp_path}/two", "--distributed",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "global test accuracy" in outs[0][0] and "global test accuracy" not in outs[1][0]

  r1, r2 = _rows(f"{tmp_path}/one"), _rows(f"{tmp_path}/two")
  assert [r["round"] for r in r1] == [r["round"] for r in r2] == [0, 2, 4]
  for a, b in zip(r1, r2):
    np.testing.assert_allclose(a["test_accuracy"], b["test_accuracy"], atol=1e-6)
    np.testing.assert_allclose(a.get("train_loss", 0), b.get("train_loss", 0), rtol=1e-5)

  # Both checkpoints restore in this 1-process, 1-device interpreter and agree.
  small_config.clients_per_round = 6
  exp = build_experiment(small_config)
  template = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, 0, exp.mesh)
  states = []
  for name in ("one", "two"):
    ck = Checkpointer(f"{tmp_path}/{name}/checkpoints")
    assert ck.latest_round() == 4
    states.append(ck.restore(template))
    ck.close()
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
