"""Multi-host start-up: multi-controller JAX (``jax.distributed``).

Every process runs the same program; the round's mesh spans all processes'
devices (``jax.devices()`` is global after initialization), the data and the
state are replicated on it, Orbax writes each checkpoint once (coordinated
across processes) and any process count can read it back. On CPU the
collectives run over Gloo.
"""
from __future__ import annotations

import os
from typing import Optional

import jax


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Calls ``jax.distributed.initialize``; must run before any JAX computation.

  Arguments left as None are read from ``FEDJAX_SIM_COORDINATOR``,
  ``FEDJAX_SIM_NUM_PROCESSES`` and ``FEDJAX_SIM_PROCESS_ID``, and otherwise
  left for JAX to detect (SLURM, Open MPI, Kubernetes, Cloud TPU).

  Raises:
    RuntimeError: JAX could not connect (the message names the coordinator).
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("FEDJAX_SIM_COORDINATOR")
  if num_processes is None and "FEDJAX_SIM_NUM_PROCESSES" in env:
    num_processes = int(env["FEDJAX_SIM_NUM_PROCESSES"])
  if process_id is None and "FEDJAX_SIM_PROCESS_ID" in env:
    process_id = int(env["FEDJAX_SIM_PROCESS_ID"])
  # CPU collectives across processes need Gloo (the default CPU backend has none).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except Exception as err:
    raise RuntimeError(
        f"jax.distributed.initialize failed (coordinator={coordinator_address!r}, "
        f"num_processes={num_processes}, process_id={process_id}): {err}. Give every process "
        "the same --coordinator_address=<host:port> and --num_processes, and a distinct "
        "--process_id.") from err
