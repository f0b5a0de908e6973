"""MNIST-1D, generated offline and cached: dataset ``mnist1d`` (``--config.data.dataset=mnist1d``).

Source: Greydanus and Kobak, "Scaling down deep learning with MNIST-1D"
(arXiv 2011.14439, ICML 2024). Each example is a 1-D signal of 40 steps made
from one of ten digit templates (12 points each) by padding, dilation, scaling,
translation, correlated and i.i.d. noise and shear; the dataset is
standardized as a whole (mean 0, standard deviation 1). Labels are balanced:
``num_samples // 10`` examples per class, the first 80% of a shuffled order
train, the rest test (4,000 / 1,000 at the paper's ``num_samples`` = 5,000).

The arrays come from the PyPI package ``mnist1d``'s template generator
(``mnist1d.data.make_dataset``) with the paper's arguments
(:data:`GENERATOR_ARGS`, equal to the package's ``get_dataset_args()``,
tested), never from its ``get_dataset``, which downloads a pickle: nothing
here touches the network. The generator seeds NumPy's and Python's global
random state; :func:`generate` restores both afterwards.

A generated dataset is cached as a NumPy ``.npz`` (no pickle) under
:func:`cache_dir`, keyed by the arguments and the package version, so a
100,000-example dataset (about 15 s to generate on one core) is made once. A
cache file that cannot be read or does not hold what the key says is
regenerated and rewritten; an unwritable cache directory only costs the
regeneration next time.

Knobs (``cfg.data.<knob>``): ``num_samples`` (default 5,000, a multiple of 10;
100,000 and more for client scale) and ``mnist1d_seed`` (the generator's seed,
default 42 as in the paper). The dataset does not depend on the run seed, so
every run and seed sees the same examples (as ``digits``' fixed test split);
the run seed draws the partition and the clients' train/test splits.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from typing import Optional

import numpy as np

from fedjax_sim.data.registry import DatasetError, register_dataset
from fedjax_sim.data.sources import Dataset

__all__ = ["GENERATOR_ARGS", "cache_dir", "cache_path", "generate", "load_arrays", "load_mnist1d"]

# The paper's generator arguments besides num_samples and seed (mnist1d's get_dataset_args();
# arXiv 2011.14439, Sec. 2 and Appendix A).
GENERATOR_ARGS = {
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
}
NUM_CLASSES = 10
_KEYS = ("x", "y", "x_test", "y_test")


def cache_dir() -> str:
  """Where generated datasets are cached: ``$FEDJAX_SIM_CACHE``, else
  ``$XDG_CACHE_HOME/fedjax_sim``, else ``~/.cache/fedjax_sim``."""
  if os.environ.get("FEDJAX_SIM_CACHE"):
    return os.environ["FEDJAX_SIM_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fedjax_sim")


def _package_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("mnist1d")
  except metadata.PackageNotFoundError:  # a source checkout
    return "unknown"


def cache_path(num_samples: int, seed: int) -> str:
  """The cache file of ``(num_samples, seed)``: its name holds both and a hash of the generator
  arguments and the ``mnist1d`` version, so changing either makes a new file."""
  key = json.dumps({"args": GENERATOR_ARGS, "num_samples": int(num_samples), "seed": int(seed),
                    "mnist1d": _package_version()}, sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(cache_dir(), "mnist1d", f"n{int(num_samples)}_seed{int(seed)}_{digest}.npz")


def _check_knobs(num_samples, seed) -> None:
  if (isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
      or num_samples < 2 * NUM_CLASSES or num_samples % NUM_CLASSES):
    raise DatasetError(f"data.num_samples={num_samples!r} must be a multiple of 10 (balanced "
                       "classes), at least 20; set --config.data.num_samples (default 5000: "
                       "4,000 train and 1,000 test).")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise DatasetError(f"data.mnist1d_seed={seed!r} must be an integer in [0, 2**32); set "
                       "--config.data.mnist1d_seed (default 42, the paper's).")


def generate(num_samples: int = 5000, seed: int = 42) -> dict[str, np.ndarray]:
  """Generates MNIST-1D with the paper's arguments (no cache, no network).

  Args:
    num_samples: examples in total, a multiple of 10 (``num_samples // 10`` per class).
    seed: the generator's seed (the package seeds NumPy's and Python's global
      random state with it; both are restored afterwards).

  Returns:
    ``{"x": float32 [N_train, 40], "y": int32 [N_train], "x_test": float32
    [N_test, 40], "y_test": int32 [N_test]}``, N_train = 0.8 * num_samples.

  Raises:
    DatasetError: ``num_samples`` or ``seed`` out of range.
  """
  _check_knobs(num_samples, seed)
  from mnist1d.data import make_dataset
  from mnist1d.utils import ObjectView
  args = ObjectView({**GENERATOR_ARGS, "num_samples": int(num_samples), "seed": int(seed)})
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    out = make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return {"x": out["x"].astype(np.float32), "y": out["y"].astype(np.int32),
          "x_test": out["x_test"].astype(np.float32), "y_test": out["y_test"].astype(np.int32)}


def _valid(arrays: dict, num_samples: int) -> bool:
  """The arrays are what a generation of ``num_samples`` returns (shapes, dtypes, values)."""
  if set(arrays) != set(_KEYS):
    return False
  n_train = int(num_samples * GENERATOR_ARGS["train_split"])
  length = GENERATOR_ARGS["final_seq_length"]
  x, y, xt, yt = (arrays[k] for k in _KEYS)
  return (x.shape == (n_train, length) and xt.shape == (num_samples - n_train, length)
          and y.shape == (n_train,) and yt.shape == (num_samples - n_train,)
          and x.dtype == xt.dtype == np.float32 and y.dtype == yt.dtype == np.int32
          and bool(np.isfinite(x).all() and np.isfinite(xt).all())
          and bool(((y >= 0) & (y < NUM_CLASSES)).all() and ((yt >= 0) & (yt < NUM_CLASSES)).all()))


def _read(path: str, num_samples: int) -> Optional[dict[str, np.ndarray]]:
  """The cached arrays, or None when the file is missing, unreadable or not what it should be."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception:  # a truncated or foreign file: zipfile, OSError, ValueError, EOFError, ...
    return None
  return arrays if _valid(arrays, num_samples) else None


def _write(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes atomically (a temporary file, then a rename); gives up silently if it cannot."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=os.path.dirname(path))
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
      os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  except OSError:
    pass


def load_arrays(num_samples: int = 5000, seed: int = 42,
                cache: bool = True) -> dict[str, np.ndarray]:
  """:func:`generate`'s arrays, read from the cache when it holds them, else generated (and
  cached, when ``cache``).

  Raises:
    DatasetError: ``num_samples`` or ``seed`` out of range.
  """
  _check_knobs(num_samples, seed)
  path = cache_path(num_samples, seed)
  arrays = _read(path, num_samples) if cache else None
  if arrays is None:
    arrays = generate(num_samples, seed)
    if cache:
      _write(path, arrays)
  return arrays


@register_dataset("mnist1d")
def load_mnist1d(num_samples: int = 5000, mnist1d_seed: int = 42) -> Dataset:
  """MNIST-1D (arXiv 2011.14439): 1-D signals [40] float32, 10 balanced classes.

  Args:
    num_samples: ``cfg.data.num_samples``, examples in total (80% train, 20%
      the global test set); 5,000 as in the paper.
    mnist1d_seed: ``cfg.data.mnist1d_seed``, the generator's seed (42 as in
      the paper); independent of the run seed.

  Returns:
    A centralized :class:`~fedjax_sim.data.Dataset` (train [0.8 N, 40], test
    [0.2 N, 40]) that the pipeline partitions over the clients.

  Raises:
    DatasetError: ``num_samples`` not a multiple of 10 or below 20; a seed
      out of range.
  """
  a = load_arrays(num_samples, mnist1d_seed)
  return Dataset(a["x"], a["y"], a["x_test"], a["y_test"], NUM_CLASSES, "mnist1d")
