"""Natural-partition datasets from their standard on-disk formats: LEAF JSON, FedJAX SQLite,
Parquet tables with a client-id column.

A natural dataset defines its clients (FEMNIST: one per writer, Shakespeare: one per speaking
role), so no partitioner runs: each client's examples stay that client's. Three formats,
named by ``--config.data.dataset``:

* ``leaf:<dir>``: LEAF's JSON (Caldas et al., arXiv 1812.01097; github.com/TalwalkarLab/leaf):
  files ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y":
  [...]}}}`` in ``<dir>/train/*.json`` and ``<dir>/test/*.json`` as ``preprocess.sh`` writes
  them (``<dir>`` is ``data/<name>/data`` or ``data/<name>``). Flavours: FEMNIST (x = 784
  floats, a 28x28 grayscale image / 255 as LEAF's ``data_to_json.py`` writes it, background
  1.0, kept as stored; y in [0, 62)), Shakespeare (x = an 80-character string, y = the next
  character) and plain numeric vectors (x = d floats, y an int label).
* ``sqlite:<path>``: FedJAX's SQLite client data (``fedjax.core.sqlite_federated_data``):
  a table ``federated_data(client_id BLOB, data BLOB, num_examples INTEGER)`` whose ``data``
  is a zlib-compressed msgpack dict of NumPy arrays, read in ``rowid`` order. ``<path>`` is the
  train file (its test file is the same name with ``train`` -> ``test``) or a folder holding
  ``*train*.sqlite`` and ``*test*.sqlite``. Features: EMNIST (``pixels`` [N, 28, 28],
  ``label``; x = 1 - pixels as FedJAX's ``emnist.load_data``), Shakespeare (``snippets``: byte
  strings, chunked as FedJAX's ``shakespeare.preprocess_client``), or plain ``x``/``y``.
* ``parquet:<path>``: a Parquet file or a folder of them (Hugging Face / flwr-datasets layout:
  files whose name starts with ``test`` are the test split, the rest train), read with
  pyarrow. The client column is ``data.client_column`` or the first of :data:`CLIENT_COLUMNS`
  present; features: FEMNIST (``image`` PNG bytes + ``character``, ``flwrlabs/femnist``),
  Shakespeare (``x``/``y`` strings, ``flwrlabs/shakespeare``), or numeric ``x`` (list) + ``y``.

Shakespeare-style data becomes the next-character task (:mod:`fedjax_sim.data.text`: x, y
int32 [N, T] with T = ``data.sequence_length``; model ``char_gru``); image and vector data a
classification task.

Knobs (``cfg.data``): ``min_client_size`` (drop clients with fewer training examples),
``max_client_size`` (keep each client's first that many training and test examples; 0 = all),
``max_clients`` (a uniform sample of that many of the remaining clients, NumPy stream
``partition`` of the run seed; 0 = all), ``client_test_fraction`` (each client's test part
when the files have no test split, stream ``split``), ``sequence_length``, ``client_column``.
The global test set is the union of the kept clients' test parts; when the test split has
other users than the training split (LEAF ``-t user``), it is all test users' examples.
``FederatedData.aux["client_ids"]`` holds the kept clients' ids (str [C]) in file order.

Raises (every loader): :class:`DatasetError` with one line: a missing file names the command
that prepares it on a machine with network; an unknown layout names the supported ones.
"""
from __future__ import annotations

import glob
import io
import json
import os
import sqlite3
import zlib
from typing import Any, Optional

import numpy as np

from fedjax_sim import seeding
from fedjax_sim.client_data import ClientData, pack
from fedjax_sim.data import text
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.data.partitioners import train_test_split_clients
from fedjax_sim.data.registry import DatasetError, register_dataset

__all__ = ["CLIENT_COLUMNS", "load_leaf", "load_parquet", "load_sqlite", "natural_federated",
           "read_leaf", "read_parquet", "read_sqlite"]

CLIENT_COLUMNS = ("client_id", "writer_id", "character_id", "user_id", "partition_id")

# A split: client id -> (x, y) host arrays, in file order.
Split = dict

LEAF_PREPARE = (
    "on a machine with network run `git clone https://github.com/TalwalkarLab/leaf && cd "
    "leaf/data/shakespeare && ./preprocess.sh -s niid --sf 0.2 -k 0 -t sample -tf 0.8` (FEMNIST: "
    "cd leaf/data/femnist && ./preprocess.sh -s niid --sf 0.05 -k 0 -t sample), copy "
    "leaf/data/<name>/data here and pass --config.data.dataset=leaf:<that folder>")
SQLITE_PREPARE = (
    "on a machine with network download FedJAX's files, e.g. `wget https://storage.googleapis"
    ".com/gresearch/fedjax/shakespeare/shakespeare_{train,test}.sqlite` (EMNIST: https://"
    "storage.googleapis.com/gresearch/fedjax/emnist/federated_emnist_{train,test}.sqlite; or "
    "`python -c \"import fedjax; fedjax.datasets.shakespeare.load_data(cache_dir='DIR')\"`), "
    "copy them here and pass --config.data.dataset=sqlite:<the train file>")
PARQUET_PREPARE = (
    "on a machine with network run `python -c \"from datasets import load_dataset; "
    "load_dataset('flwrlabs/shakespeare', split='train').to_parquet('shakespeare.parquet')\"` "
    "(FEMNIST: 'flwrlabs/femnist'; pip install datasets), copy the file here and pass "
    "--config.data.dataset=parquet:<that file>")


# ----------------------------------------------------------------------------- LEAF JSON

def _leaf_split_dirs(path: str) -> tuple[list[str], list[str]]:
  for root in (path, os.path.join(path, "data")):
    train = sorted(glob.glob(os.path.join(root, "train", "*.json")))
    if train:
      return train, sorted(glob.glob(os.path.join(root, "test", "*.json")))
  return sorted(glob.glob(os.path.join(path, "*.json"))), []


def _read_leaf_files(files: list[str]) -> dict[str, dict]:
  users: dict[str, dict] = {}
  for f in files:
    try:
      with open(f) as fh:
        blob = json.load(fh)
      names, data = blob["users"], blob["user_data"]
    except (OSError, ValueError, KeyError, TypeError) as err:
      raise DatasetError(f"{f} is not a LEAF JSON file ({type(err).__name__}: {err}); it needs "
                         "keys users, num_samples and user_data {user: {x, y}}; re-run LEAF's "
                         "preprocess.sh.") from err
    for u in names:
      d = data[u]
      if u in users:
        users[u] = {"x": users[u]["x"] + list(d["x"]), "y": users[u]["y"] + list(d["y"])}
      else:
        users[u] = {"x": list(d["x"]), "y": list(d["y"])}
  return users


def read_leaf(path: str, sequence_length: int = 80) -> tuple[Split, Optional[Split], int, str]:
  """LEAF JSON under ``path`` -> (train, test or None, num_classes, kind).

  kind is ``femnist`` (x float32 [n, 28, 28, 1], y int32 [n]), ``shakespeare`` (x, y int32
  [n, T]) or ``vector`` (x float32 [n, d]).

  Raises:
    DatasetError: no JSON files (names the LEAF command), a malformed file, or a flavour
      other than these (e.g. Sent140's token lists, CelebA's file names).
  """
  train_files, test_files = _leaf_split_dirs(path)
  if not train_files:
    raise DatasetError(f"no LEAF JSON files in {path!r} (looked for train/*.json, "
                       f"data/train/*.json and *.json); {LEAF_PREPARE}.")
  splits = [_read_leaf_files(train_files), _read_leaf_files(test_files) if test_files else None]
  first = next((d for d in splits[0].values() if d["x"]), None)
  if first is None:
    raise DatasetError(f"the LEAF files in {path!r} hold no examples; re-run preprocess.sh.")
  x0, y0 = first["x"][0], first["y"][0]
  if isinstance(x0, str) and isinstance(y0, str):
    kind = "shakespeare"
    conv = lambda d: text.encode_pairs(d["x"], d["y"], sequence_length)
  elif isinstance(x0, list) and x0 and all(isinstance(v, (int, float)) for v in x0[:8]) \
      and isinstance(y0, (int, float)):
    kind = "femnist" if len(x0) == 784 else "vector"
    shape = (28, 28, 1) if kind == "femnist" else (len(x0),)
    conv = lambda d: (np.asarray(d["x"], np.float32).reshape(-1, *shape),
                      np.asarray(d["y"], np.int32))
  else:
    raise DatasetError(f"LEAF flavour of {path!r} not supported (first example: x "
                       f"{type(x0).__name__}, y {type(y0).__name__}); supported: FEMNIST (x = "
                       "784 floats, y int), Shakespeare (x and y strings), numeric vectors.")
  out = [None if s is None else {u: conv(d) for u, d in s.items()} for s in splits]
  if kind == "shakespeare":
    num_classes = text.VOCAB_SIZE
  else:
    top = max(int(y.max()) for s in out if s for _, y in s.values() if len(y))
    num_classes = 62 if kind == "femnist" else top + 1
  return out[0], out[1], num_classes, kind


# ----------------------------------------------------------------------------- FedJAX SQLite

def _msgpack_ext(code: int, data: bytes):
  """FedJAX's msgpack extension types (``fedjax/core/serialization.py``): 1 ndarray, 3 NumPy
  scalar (both (shape, dtype name, C-order bytes)), 4 ndarray of bytes ((shape, flat list))."""
  import msgpack
  if code in (1, 3):
    shape, dtype, buf = msgpack.unpackb(data, raw=True)
    arr = np.frombuffer(buf, dtype=np.dtype(dtype.decode())).reshape(shape)
    return arr[()] if code == 3 else arr
  if code == 4:
    shape, flat = msgpack.unpackb(data, raw=True)
    return np.array(flat, dtype=object).reshape(shape)
  raise DatasetError(f"unknown msgpack extension type {code} in a FedJAX SQLite blob; only "
                     "ndarrays, NumPy scalars and bytes arrays are supported.")


def _read_sqlite_file(path: str) -> dict[str, dict]:
  import msgpack
  try:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
      rows = con.execute("SELECT client_id, data FROM federated_data ORDER BY rowid;").fetchall()
    finally:
      con.close()
  except sqlite3.Error as err:
    raise DatasetError(f"{path} is not FedJAX SQLite client data ({err}); it needs a table "
                       "federated_data(client_id, data, num_examples); "
                       f"{SQLITE_PREPARE}.") from err
  out = {}
  for cid, blob in rows:
    key = cid.decode() if isinstance(cid, bytes) else str(cid)
    out[key] = msgpack.unpackb(zlib.decompress(blob), ext_hook=_msgpack_ext, raw=False)
  return out


def _sqlite_files(path: str) -> tuple[str, Optional[str]]:
  if os.path.isdir(path):
    train = sorted(glob.glob(os.path.join(path, "*train*.sqlite")))
    test = sorted(glob.glob(os.path.join(path, "*test*.sqlite")))
    if not train:
      raise DatasetError(f"no *train*.sqlite file in {path!r}; {SQLITE_PREPARE}.")
    return train[0], (test[0] if test else None)
  if not os.path.isfile(path):
    raise DatasetError(f"SQLite file {path!r} does not exist; {SQLITE_PREPARE}.")
  head, tail = os.path.split(path)
  test = os.path.join(head, tail.replace("train", "test")) if "train" in tail else None
  return path, (test if test and os.path.isfile(test) else None)


def read_sqlite(path: str, sequence_length: int = 80) -> tuple[Split, Optional[Split], int, str]:
  """FedJAX SQLite client data -> (train, test or None, num_classes, kind).

  kind ``femnist`` (features pixels, label: x = 1 - pixels, float32 [n, 28, 28, 1]),
  ``shakespeare`` (snippets -> :func:`fedjax_sim.data.text.encode_snippets`) or ``vector``
  (features x, y).

  Raises:
    DatasetError: a missing file (names the download), not FedJAX's table, or other features.
  """
  train_path, test_path = _sqlite_files(path)
  raw = [_read_sqlite_file(train_path), _read_sqlite_file(test_path) if test_path else None]
  feats = sorted(next(iter(raw[0].values()), {}))
  if {"pixels", "label"} <= set(feats):
    kind = "femnist"
    conv = lambda d: ((1.0 - np.asarray(d["pixels"], np.float32))[..., None],
                      np.asarray(d["label"], np.int32))
  elif "snippets" in feats:
    kind = "shakespeare"
    conv = lambda d: text.encode_snippets(list(d["snippets"]), sequence_length)
  elif {"x", "y"} <= set(feats):
    kind = "vector"
    conv = lambda d: (np.asarray(d["x"], np.float32), np.asarray(d["y"], np.int32))
  else:
    raise DatasetError(f"{train_path}: features {feats} not supported; supported: pixels+label "
                       "(EMNIST), snippets (Shakespeare), x+y.")
  out = [None if s is None else {u: conv(d) for u, d in s.items()} for s in raw]
  if kind == "shakespeare":
    num_classes = text.VOCAB_SIZE
  else:
    top = max(int(y.max()) for s in out if s for _, y in s.values() if len(y))
    num_classes = (62 if top >= 10 else 10) if kind == "femnist" else top + 1
  return out[0], out[1], num_classes, kind


# ----------------------------------------------------------------------------- Parquet

def _parquet_files(path: str) -> tuple[list[str], list[str]]:
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
  elif os.path.isfile(path):
    files = [path]
  else:
    raise DatasetError(f"Parquet path {path!r} does not exist; {PARQUET_PREPARE}.")
  if not files:
    raise DatasetError(f"no *.parquet files under {path!r}; {PARQUET_PREPARE}.")
  is_test = lambda f: os.path.basename(f).startswith("test") or os.sep + "test" in \
      os.path.relpath(f, path if os.path.isdir(path) else os.path.dirname(path))
  test = [f for f in files if is_test(f)]
  return [f for f in files if f not in test], test


def _decode_png(blob: Any) -> np.ndarray:
  from PIL import Image
  data = blob["bytes"] if isinstance(blob, dict) else blob
  return np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float32) / 255.0


def _group(ids: list) -> dict[str, np.ndarray]:
  """client id -> its row indices, clients in order of first appearance."""
  keys, first, inverse = np.unique(np.asarray([str(i) for i in ids]), return_index=True,
                                   return_inverse=True)
  order = np.argsort(first, kind="stable")
  rows = np.argsort(inverse, kind="stable")
  bounds = np.cumsum(np.bincount(inverse, minlength=len(keys)))
  starts = bounds - np.bincount(inverse, minlength=len(keys))
  return {str(keys[k]): rows[starts[k]:bounds[k]] for k in order}


def read_parquet(path: str, sequence_length: int = 80, client_column: str = ""
                 ) -> tuple[Split, Optional[Split], int, str]:
  """Parquet client tables -> (train, test or None, num_classes, kind).

  kind ``femnist`` (columns image (PNG bytes or {bytes, path}) and character: x float32
  [n, 28, 28, 1] in [0, 1]), ``shakespeare`` (string columns x, y) or ``vector`` (list column
  x, int column y).

  Raises:
    DatasetError: a missing path (names the Hugging Face command), no client column, or
      columns of another layout.
  """
  import pyarrow.parquet as pq
  train_files, test_files = _parquet_files(path)
  tables = [pq.read_table(train_files) if len(train_files) > 1 else pq.read_table(train_files[0]),
            (pq.read_table(test_files) if len(test_files) > 1 else pq.read_table(test_files[0]))
            if test_files else None]
  cols = tables[0].column_names
  cid = client_column or next((c for c in CLIENT_COLUMNS if c in cols), "")
  if cid not in cols:
    raise DatasetError(f"{path}: no client-id column (columns {cols}); set "
                       f"--config.data.client_column to one of them (auto: "
                       f"{', '.join(CLIENT_COLUMNS)}).")
  if {"image", "character"} <= set(cols):
    kind = "femnist"

    def conv(t, rows):
      imgs = t.column("image").take(rows).to_pylist()
      x = np.stack([_decode_png(b) for b in imgs])[..., None] if imgs else \
          np.zeros((0, 28, 28, 1), np.float32)
      return x, t.column("character").take(rows).to_numpy().astype(np.int32)
  elif {"x", "y"} <= set(cols) and str(tables[0].schema.field("x").type) in ("string",
                                                                             "large_string"):
    kind = "shakespeare"

    def conv(t, rows):
      return text.encode_pairs(t.column("x").take(rows).to_pylist(),
                               t.column("y").take(rows).to_pylist(), sequence_length)
  elif {"x", "y"} <= set(cols):
    kind = "vector"

    def conv(t, rows):
      return (np.asarray(t.column("x").take(rows).to_pylist(), np.float32),
              t.column("y").take(rows).to_numpy().astype(np.int32))
  else:
    raise DatasetError(f"{path}: columns {cols} not supported; supported: {cid} plus image + "
                       "character (FEMNIST), x + y strings (Shakespeare), or x (list) + y.")
  out = []
  for t in tables:
    if t is None:
      out.append(None)
      continue
    groups = _group(t.column(cid).to_pylist())
    out.append({u: conv(t, rows) for u, rows in groups.items()})
  if kind == "shakespeare":
    num_classes = text.VOCAB_SIZE
  else:
    top = max(int(y.max()) for s in out if s for _, y in s.values() if len(y))
    num_classes = 62 if kind == "femnist" else top + 1
  return out[0], out[1], num_classes, kind


# ----------------------------------------------------------------------------- clients

def _pack_tokens(xs: list[np.ndarray], ys: list[np.ndarray], multiple: int = 1) -> ClientData:
  """Sequence clients -> ClientData x, y int32 [C, N, T] (padding rows x PAD, y IGNORE)."""
  sizes = np.array([len(y) for y in ys], np.int32)
  t = xs[0].shape[1]
  n = -(-max(int(sizes.max()), 1) // multiple) * multiple
  x = np.full((len(xs), n, t), text.PAD, np.int32)
  y = np.full((len(xs), n, t), text.IGNORE, np.int32)
  for k, (a, b) in enumerate(zip(xs, ys)):
    x[k, :len(a)], y[k, :len(b)] = a, b
  return ClientData(x, y, np.arange(n)[None] < sizes[:, None], sizes)


def natural_federated(train: Split, test: Optional[Split], num_classes: int, kind: str, name: str,
                      *, min_client_size: int = 1, max_client_size: int = 0, max_clients: int = 0,
                      client_test_fraction: float = 0.2, seed: int = 0,
                      batch_size: int = 1) -> FederatedData:
  """Natural clients -> host :class:`FederatedData` (filter, cap, sample, split, pack).

  Args:
    train: client id -> (x [n, ...], y [n] or [n, T]), in file order.
    test: the same for the test split, or None (each client's examples are then split with
      ``client_test_fraction``, NumPy stream ``split``).
    num_classes: labels (the vocabulary size V for sequences).  kind: see the readers.
    name: the dataset name.
    min_client_size: drop clients with fewer training examples (>= 1).
    max_client_size: keep each client's first that many training (and test) examples; 0 = all.
    max_clients: keep a uniform sample of that many clients (stream ``partition``); 0 = all.
    client_test_fraction: see ``test``.  seed: the run seed.  batch_size: N is padded to a
      multiple of it.

  Raises:
    DatasetError: a knob out of range, or no client left.
  """
  for knob, v, lo in (("min_client_size", min_client_size, 1), ("max_client_size",
                                                                max_client_size, 0),
                      ("max_clients", max_clients, 0)):
    if int(v) < lo:
      raise DatasetError(f"data.{knob}={v} must be >= {lo}; set --config.data.{knob}.")
  cap = lambda a: a[:max_client_size] if max_client_size else a
  ids = [u for u, (_, y) in train.items() if len(y) >= min_client_size]
  if not ids:
    raise DatasetError(f"{name}: no client has >= data.min_client_size={min_client_size} "
                       "training examples; lower --config.data.min_client_size.")
  if max_clients and len(ids) > max_clients:
    pick = np.random.default_rng(seeding.numpy_seed(seed, "partition")).choice(
        len(ids), max_clients, replace=False)
    ids = [ids[i] for i in np.sort(pick)]
  tr = [tuple(cap(a) for a in train[u]) for u in ids]
  x0, y0 = tr[0]
  empty = (np.zeros((0, *x0.shape[1:]), x0.dtype), np.zeros((0, *y0.shape[1:]), y0.dtype))
  if test is None:
    parts = [np.arange(len(y)) for _, y in tr]
    tr_idx, te_idx = train_test_split_clients(parts, float(client_test_fraction),
                                              seeding.numpy_seed(seed, "split"))
    te = [(x[j], y[j]) for (x, y), j in zip(tr, te_idx)]
    tr = [(x[i], y[i]) for (x, y), i in zip(tr, tr_idx)]
  else:
    te = [tuple(cap(a) for a in test.get(u, empty)) for u in ids]
  if sum(len(y) for _, y in te) or test is None:
    gx = np.concatenate([x for x, _ in te])
    gy = np.concatenate([y for _, y in te])
  elif sum(len(y) for _, y in test.values()):  # disjoint test users (LEAF -t user): all of them
    gx = np.concatenate([cap(x) for x, _ in test.values()])
    gy = np.concatenate([cap(y) for _, y in test.values()])
  else:
    raise DatasetError(f"{name}: the test split holds no examples; remove the test files to "
                       "split each client's examples instead (--config.data.client_test_fraction).")
  if kind == "shakespeare":
    train_cd = _pack_tokens([x for x, _ in tr], [y for _, y in tr], batch_size)
    test_cd = _pack_tokens([x for x, _ in te], [y for _, y in te])
  else:
    train_cd = pack([x for x, _ in tr], [y for _, y in tr], batch_size)
    test_cd = pack([x for x, _ in te], [y for _, y in te])
  return FederatedData(train_cd, test_cd, gx, gy, int(num_classes), tuple(x0.shape[1:]), name,
                       aux={"client_ids": np.asarray(ids)})


def _natural(reader, what: str, knobs: dict) -> FederatedData:
  path = knobs.pop("path")
  seq = int(knobs.pop("sequence_length"))
  if seq < 1:
    raise DatasetError(f"data.sequence_length={seq} must be >= 1; set "
                       "--config.data.sequence_length (e.g. 80).")
  extra = {"client_column": knobs.pop("client_column")} if "client_column" in knobs else {}
  storage = knobs.pop("storage")
  train, test, num_classes, kind = reader(path, seq, **extra)
  if kind == "shakespeare" and storage == "flat":
    raise DatasetError(f"{what}:{path} is a next-character task (labels [N, T]), which flat "
                       "storage does not hold yet; set --config.data.storage=padded and bound "
                       "memory with --config.data.max_client_size.")
  return natural_federated(train, test, num_classes, kind, f"{what}:{path}", **knobs)


@register_dataset("leaf:<path>", defines_clients=True)
def load_leaf(path: str, min_client_size: int = 1, max_client_size: int = 0,
              max_clients: int = 0, client_test_fraction: float = 0.2,
              sequence_length: int = 80, storage: str = "padded", seed: int = 0,
              batch_size: int = 1) -> FederatedData:
  """``--config.data.dataset=leaf:<dir>``: LEAF JSON (:func:`read_leaf`), natural clients
  (:func:`natural_federated`)."""
  return _natural(read_leaf, "leaf", dict(locals()))


@register_dataset("sqlite:<path>", defines_clients=True)
def load_sqlite(path: str, min_client_size: int = 1, max_client_size: int = 0,
                max_clients: int = 0, client_test_fraction: float = 0.2,
                sequence_length: int = 80, storage: str = "padded", seed: int = 0,
                batch_size: int = 1) -> FederatedData:
  """``--config.data.dataset=sqlite:<path>``: FedJAX SQLite (:func:`read_sqlite`), natural
  clients (:func:`natural_federated`)."""
  return _natural(read_sqlite, "sqlite", dict(locals()))


@register_dataset("parquet:<path>", defines_clients=True)
def load_parquet(path: str, min_client_size: int = 1, max_client_size: int = 0,
                 max_clients: int = 0, client_test_fraction: float = 0.2,
                 sequence_length: int = 80, client_column: str = "", storage: str = "padded",
                 seed: int = 0, batch_size: int = 1) -> FederatedData:
  """``--config.data.dataset=parquet:<path>``: Parquet client tables (:func:`read_parquet`),
  natural clients (:func:`natural_federated`)."""
  return _natural(read_parquet, "parquet", dict(locals()))
