"""Shared fixtures. Tests run on the CPU; multi-device tests spawn a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before
jax is imported)."""
import os
import subprocess
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import ml_collections  # noqa: E402

from fedjax_sim.launch.configs.base import get_base_config  # noqa: E402


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """A seconds-long digits config: 20 clients, 5 per round, MLP(32), no progress bar.

  Keyword overrides set top-level keys (e.g. ``rounds=2``).
  """
  c = get_base_config()
  c.data.num_clients = 20
  c.clients_per_round = 5
  c.rounds, c.eval_every, c.checkpoint_every, c.rounds_per_call, c.chunk_size = 4, 2, 2, 2, 2
  c.model_kwargs.hidden = (32,)
  c.progress = False
  c.update(overrides)
  return c


@pytest.fixture
def small_config() -> ml_collections.ConfigDict:
  """:func:`tiny_config` as a fresh fixture per test (4 rounds, eval/checkpoint every 2)."""
  return tiny_config()


def random_image_clients(num_clients: int, n: int = 16, num_classes: int = 4, seed: int = 0):
  """ClientData of random 8x8x1 images: x float32 [C, n, 8, 8, 1], labels in
  [0, num_classes), client sizes drawn in [5, n] (the rest padding, label 0)."""
  import jax.numpy as jnp
  import numpy as np
  from fedjax_sim.client_data import ClientData
  rng = np.random.default_rng(seed)
  x = rng.random((num_clients, n, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, num_classes, (num_clients, n)).astype(np.int32)
  sizes = rng.integers(5, n + 1, num_clients).astype(np.int32)
  mask = np.arange(n)[None] < sizes[:, None]
  return ClientData(jnp.asarray(x), jnp.asarray(y * mask), jnp.asarray(mask), jnp.asarray(sizes))


def run_python(code: str, devices: int = 8, timeout: int = 300) -> str:
  """Runs ``code`` in a fresh interpreter with ``devices`` forced CPU devices; returns stdout.

  The subprocess compiles with XLA's CPU backend optimization level 0: these checks compare
  two layouts of the same computation inside that one process (1 device against 8), both
  compiled alike, and compilation is most of their time (level 0 is about a fifth faster).
  """
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=timeout)
  if out.returncode != 0:
    raise AssertionError(f"subprocess failed:\n{out.stderr[-4000:]}")
  return out.stdout
