"""Dataset sources: embedded digits, TFDS datasets, and LEAF Synthetic(alpha, beta).

Every centralized source returns a :class:`Dataset` of NumPy arrays (host
memory) and is registered by name (``digits``, ``tfds:<name>``;
:func:`fedjax_sim.data.register_dataset`); partitioning and packing into
device-resident client arrays happen in :mod:`fedjax_sim.data.pipeline`, which
also registers ``synthetic`` (its generator defines the clients).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from fedjax_sim.data.registry import DatasetError, bind, get_dataset, register_dataset

TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A centralized dataset before partitioning.

  Attributes:
    train_x: float32 [N_train, *input_shape], scaled to [0, 1] (images) or raw.
    train_y: int32 [N_train], labels in [0, num_classes).
    test_x: float32 [N_test, *input_shape]; the global test set.
    test_y: int32 [N_test].
    num_classes: number of labels.
    name: the source name, e.g. ``digits`` or ``tfds:fashion_mnist``.
  """
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  name: str

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.train_x.shape[1:])


@register_dataset("digits")
def load_digits(test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
  """scikit-learn's 1,797 real 8x8 handwritten digits (UCI), shipped in the wheel.

  Images are [8, 8, 1] float32 in [0, 1] (raw pixel values 0..16 divided by 16).
  The global test set is a stratified ``test_fraction`` split with a fixed seed,
  so every run and every seed of a run evaluates on the same examples.
  """
  from sklearn import datasets as skd
  from sklearn.model_selection import train_test_split
  bunch = skd.load_digits()
  x = (bunch.images.astype(np.float32) / 16.0)[..., None]
  y = bunch.target.astype(np.int32)
  tr_x, te_x, tr_y, te_y = train_test_split(
      x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
  return Dataset(tr_x, tr_y, te_x, te_y, 10, "digits")


def _tfds_missing_message(name: str, data_dir: Optional[str], err: Exception) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return (
      f"TFDS dataset '{name}' is not prepared in data_dir={where!r} ({type(err).__name__}). "
      f"Fix: on a machine with network access run `pip install -e .[tfds]` and then "
      f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
      f"data_dir='{where}').download_and_prepare()\"`, copy that folder here, and pass "
      f"--config.data.data_dir=<that folder>. Or use --config.data.dataset=digits "
      f"(embedded, no download).")


def load_tfds(name: str, data_dir: Optional[str] = None) -> Dataset:
  """Loads ``train``/``test`` of a prepared TFDS dataset via ``tfds.data_source``.

  Reading a prepared dataset needs no TensorFlow (array_record + numpy only).
  Images are returned as float32 [N, H, W, C] in [0, 1].

  Raises:
    DatasetError: unknown name, or the dataset is not prepared under data_dir
      (the message gives the command that prepares it).
  """
  if name not in TFDS_DATASETS:
    raise DatasetError(
        f"Unknown TFDS dataset '{name}'. Supported: {', '.join(TFDS_DATASETS)}; "
        "set --config.data.dataset=tfds:<one of those>.")
  import tensorflow_datasets as tfds
  try:
    train = tfds.data_source(name, split="train", data_dir=data_dir)
    test = tfds.data_source(name, split="test", data_dir=data_dir)
  except Exception as err:  # tfds raises several types (AssertionError, FileNotFoundError, ...)
    raise DatasetError(_tfds_missing_message(name, data_dir, err)) from err

  def to_arrays(src):
    n = len(src)
    if n == 0:
      raise DatasetError(f"TFDS dataset '{name}' has an empty split; re-prepare it.")
    try:  # batched read (fast path of array_record data sources)
      records = src.__getitems__(list(range(n)))
    except (AttributeError, TypeError):  # e.g. tfds.testing.mock_data's source
      records = [src[i] for i in range(n)]
    x = np.stack([np.asarray(r["image"]) for r in records]).astype(np.float32) / 255.0
    y = np.asarray([int(r["label"]) for r in records], dtype=np.int32)
    return x, y

  tr_x, tr_y = to_arrays(train)
  te_x, te_y = to_arrays(test)
  num_classes = 100 if name == "cifar100" else 10
  return Dataset(tr_x, tr_y, te_x, te_y, num_classes, f"tfds:{name}")


def synthetic_leaf(num_clients: int, alpha: float = 1.0, beta: float = 1.0,
                   dim: int = 60, num_classes: int = 10, seed=0,
                   mean_examples: float = 50.0, iid: bool = False):
  """LEAF / FedProx Synthetic(alpha, beta) (Li et al., arXiv 1812.06127, Sec. 5.1).

  Client k: u_k ~ N(0, alpha), B_k ~ N(0, beta); W_k [num_classes, dim] and
  b_k ~ N(u_k, 1); v_k[j] ~ N(B_k, 1); x ~ N(v_k, Sigma) with
  Sigma = diag(j^-1.2); y = argmax(softmax(W_k x + b_k)). Client sizes follow a
  lognormal with mean ``mean_examples`` (at least 4 examples each).

  ``seed``: an int or a ``np.random.SeedSequence`` (the pipeline passes the
  run's ``dataset`` stream, ``fedjax_sim.seeding.numpy_seed(seed, "dataset")``).

  Returns:
    (xs, ys): lists of length num_clients; xs[k] float32 [n_k, dim],
    ys[k] int32 [n_k]. Already partitioned (the generator defines the clients).
  """
  if alpha < 0 or beta < 0:
    raise DatasetError(f"synthetic alpha={alpha}, beta={beta} must be >= 0.")
  rng = np.random.default_rng(seed)
  sizes = np.maximum(rng.lognormal(np.log(mean_examples) - 0.5, 1.0, num_clients), 4).astype(int)
  sigma = np.arange(1, dim + 1, dtype=np.float64) ** -1.2
  w_glob = rng.normal(0, 1, (num_classes, dim))
  b_glob = rng.normal(0, 1, num_classes)
  xs, ys = [], []
  for k in range(num_clients):
    u = rng.normal(0, np.sqrt(alpha)) if not iid else 0.0
    bk = rng.normal(0, np.sqrt(beta)) if not iid else 0.0
    w = rng.normal(u, 1, (num_classes, dim)) if not iid else w_glob
    b = rng.normal(u, 1, num_classes) if not iid else b_glob
    v = rng.normal(bk, 1, dim)
    x = rng.normal(v, np.sqrt(sigma), (sizes[k], dim)).astype(np.float32)
    y = np.argmax(x @ w.T + b, axis=1).astype(np.int32)
    xs.append(x)
    ys.append(y)
  return xs, ys


def _tfds_loader(name: str):
  def load_prepared(data_dir: Optional[str] = None) -> Dataset:
    """TFDS ``name`` from ``--config.data.data_dir`` (see :func:`load_tfds`)."""
    return load_tfds(name, data_dir)
  return load_prepared


for _name in TFDS_DATASETS:  # tfds:<name>, each reading --config.data.data_dir
  register_dataset(f"tfds:{_name}")(_tfds_loader(_name))


def load(name: str, data_dir: Optional[str] = None) -> Dataset:
  """Loads a registered centralized dataset by config name (``digits``, ``tfds:<name>``, ...).

  Raises:
    DatasetError: unknown name, or the dataset defines its own clients (such as
      ``synthetic``: build it with :func:`fedjax_sim.data.build_federated_data`).
  """
  fn = get_dataset(name)
  out = fn(**bind(fn, {"data_dir": data_dir}, what=f"dataset '{name}'"))
  if not isinstance(out, Dataset):
    raise DatasetError(f"dataset '{name}' defines its own clients, not a centralized train/test "
                       "split; pick a centralized one (e.g. --config.data.dataset=digits).")
  return out
