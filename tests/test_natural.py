"""Natural-partition loaders (data/natural.py): each test writes small files in exactly one
standard format (LEAF JSON, FedJAX SQLite, Hugging Face / flwr-datasets Parquet) and checks
that the clients, their counts and their examples come back, plus the size knobs and the
one-line errors for missing files.

Axis legend: C clients, N examples, T sequence length.
"""
import io
import json
import os
import sqlite3
import zlib

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedjax_sim.data import DatasetError, build_federated_data
from fedjax_sim.data import text as vocab
from fedjax_sim.text import IGNORE

SPEECH = ("Now is the winter of our discontent made glorious summer by this sun of York; "
          "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. ")
SIZES = {"f0000_14": 5, "f0001_41": 2, "f0002_07": 7, "f0003_33": 1}


def _load(dataset, **knobs):
  return build_federated_data({"dataset": dataset, **knobs}, batch_size=2, seed=0)


def _client_rows(cd, k):
  """(x, y) host arrays of client k's real rows."""
  n = int(cd.num_examples[k])
  return np.asarray(cd.x[k, :n]), np.asarray(cd.y[k, :n])


def _images(rng, n):
  return rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)


# ----------------------------------------------------------------------------- LEAF JSON

def _write_leaf(root, user_data: dict, split: str, name="all_data_0_niid_0_keep_0"):
  os.makedirs(os.path.join(root, split), exist_ok=True)
  users = list(user_data)
  blob = {"users": users, "num_samples": [len(user_data[u]["y"]) for u in users],
          "user_data": user_data}
  with open(os.path.join(root, split, f"{name}_{split}_9.json"), "w") as f:
    json.dump(blob, f)


def test_leaf_femnist_keeps_writers_as_clients(tmp_path):
  rng = np.random.default_rng(0)
  data = {s: {u: {"x": (_images(rng, n).reshape(n, 784) / 255.0).tolist(),
                  "y": rng.integers(0, 62, n).tolist()} for u, n in SIZES.items()}
          for s in ("train", "test")}
  root = tmp_path / "femnist" / "data"  # LEAF writes data/femnist/data/{train,test}
  for s in data:
    _write_leaf(str(root), data[s], s)
  fed = _load(f"leaf:{tmp_path / 'femnist'}")  # the dataset folder or its data/ both work
  assert list(fed.aux["client_ids"]) == list(SIZES)
  assert fed.num_classes == 62 and fed.input_shape == (28, 28, 1)
  np.testing.assert_array_equal(np.asarray(fed.train.num_examples), list(SIZES.values()))
  for k, u in enumerate(SIZES):
    x, y = _client_rows(fed.train, k)
    np.testing.assert_array_equal(x, np.asarray(data["train"][u]["x"], np.float32).reshape(
        -1, 28, 28, 1))
    np.testing.assert_array_equal(y, data["train"][u]["y"])
    _, yt = _client_rows(fed.test, k)
    np.testing.assert_array_equal(yt, data["test"][u]["y"])
  assert len(fed.test_y) == sum(SIZES.values())  # the kept clients' test parts


def _leaf_shakespeare(sizes, offset=0):
  return {u: {"x": [SPEECH[offset + 3 * i + j: offset + 3 * i + j + 80] for j in range(n)],
              "y": [SPEECH[offset + 3 * i + j + 80] for j in range(n)]}
          for i, (u, n) in enumerate(sizes.items())}


def test_leaf_shakespeare_becomes_the_next_character_task(tmp_path):
  roles = {"THE_TRAGEDY_OF_KING_LEAR_EDGAR": 4, "HAMLET_OPHELIA": 6, "OTHELLO_IAGO": 3}
  train = _leaf_shakespeare(roles)
  _write_leaf(str(tmp_path), train, "train")
  _write_leaf(str(tmp_path), _leaf_shakespeare(roles, 40), "test")
  fed = _load(f"leaf:{tmp_path}", sequence_length=24)
  assert list(fed.aux["client_ids"]) == list(roles)
  assert fed.num_classes == vocab.VOCAB_SIZE and fed.input_shape == (24,)
  assert fed.train.y.shape[2] == 24 and fed.test_y.shape[1] == 24
  for k, u in enumerate(roles):
    x, y = _client_rows(fed.train, k)
    wx, wy = vocab.encode_pairs(train[u]["x"], train[u]["y"], 24)
    np.testing.assert_array_equal(x, wx)
    np.testing.assert_array_equal(y, wy)
    assert vocab.decode(y[0]) == (train[u]["x"][0] + train[u]["y"][0])[-24:]
  pad_rows = ~np.asarray(fed.train.mask)
  assert np.all(np.asarray(fed.train.y)[pad_rows] == IGNORE)  # padding rows count no token
  with pytest.raises(DatasetError, match="storage=padded"):
    _load(f"leaf:{tmp_path}", storage="flat")


def test_leaf_user_split_tests_on_all_test_users(tmp_path):
  rng = np.random.default_rng(1)
  vec = lambda n: {"x": rng.normal(size=(n, 5)).tolist(), "y": rng.integers(0, 3, n).tolist()}
  _write_leaf(str(tmp_path), {"u1": vec(4), "u2": vec(3)}, "train")
  _write_leaf(str(tmp_path), {"u3": vec(2), "u4": vec(5)}, "test")  # -t user: other users
  fed = _load(f"leaf:{tmp_path}")
  assert fed.input_shape == (5,) and fed.num_classes == 3
  assert np.asarray(fed.test.num_examples).tolist() == [0, 0]
  assert len(fed.test_y) == 7


# ----------------------------------------------------------------------------- FedJAX SQLite

def _fedjax_blob(examples: dict) -> bytes:
  """FedJAX's serialization (fedjax/core/serialization.py): msgpack with extension type 1
  for ndarrays ((shape, dtype name, C bytes)) and 4 for bytes ndarrays ((shape, flat list)),
  then zlib."""
  def ext(x):
    if x.dtype.hasobject:
      return msgpack.ExtType(4, msgpack.packb((x.shape, list(x.flatten())), use_bin_type=True))
    return msgpack.ExtType(1, msgpack.packb((x.shape, x.dtype.name, x.tobytes("C")),
                                            use_bin_type=True))
  return zlib.compress(msgpack.packb(examples, default=ext, strict_types=True))


def _write_fedjax_sqlite(path, clients: dict):
  con = sqlite3.connect(str(path))
  con.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
              "data BLOB NOT NULL, num_examples INTEGER NOT NULL);")
  con.executemany("INSERT INTO federated_data VALUES (?, ?, ?);",
                  [(cid.encode(), _fedjax_blob(ex), len(next(iter(ex.values()))))
                   for cid, ex in clients.items()])
  con.commit()
  con.close()


def test_fedjax_sqlite_emnist_reads_as_fedjax_does(tmp_path):
  rng = np.random.default_rng(2)
  ids = ["2f14e0ba9c8d7a3b:f0123_45", "00aa11bb22cc33dd:f0042_07", "ff00ee11dd22cc33:f2000_10"]
  make = lambda n: {"pixels": rng.random((n, 28, 28)).astype(np.float32),
                    "label": rng.integers(0, 62, n).astype(np.int32)}
  train = {c: make(n) for c, n in zip(ids, (3, 6, 2))}
  _write_fedjax_sqlite(tmp_path / "federated_emnist_train.sqlite", train)
  _write_fedjax_sqlite(tmp_path / "federated_emnist_test.sqlite",
                       {c: make(2) for c in ids})
  fed = _load(f"sqlite:{tmp_path / 'federated_emnist_train.sqlite'}")
  assert list(fed.aux["client_ids"]) == ids  # rowid order
  assert fed.num_classes == 62 and fed.input_shape == (28, 28, 1)
  assert np.asarray(fed.test.num_examples).tolist() == [2, 2, 2]  # the _test file
  for k, c in enumerate(ids):
    x, y = _client_rows(fed.train, k)
    np.testing.assert_array_equal(x, 1.0 - train[c]["pixels"][..., None])  # FedJAX's flip
    np.testing.assert_array_equal(y, train[c]["label"])
  assert _load(f"sqlite:{tmp_path}").num_clients == 3  # the folder works too


def test_fedjax_sqlite_shakespeare_snippets(tmp_path):
  snippets = {"KING_LEAR_EDGAR": [b"Poor Tom's a-cold.", b"Bless thy five wits!"],
              "HAMLET_HORATIO": [b"Now cracks a noble heart. Good night, sweet prince~"]}
  _write_fedjax_sqlite(tmp_path / "shakespeare_train.sqlite",
                       {c: {"snippets": np.array(s, dtype=object)} for c, s in snippets.items()})
  fed = _load(f"sqlite:{tmp_path / 'shakespeare_train.sqlite'}", sequence_length=10,
              client_test_fraction=0.0)  # no _test file: split each client (here: none)
  assert fed.num_classes == vocab.VOCAB_SIZE
  for k, c in enumerate(snippets):
    x, y = _client_rows(fed.train, k)
    wx, wy = vocab.encode_snippets(snippets[c], 10)
    np.testing.assert_array_equal(x, wx)
    np.testing.assert_array_equal(y, wy)
  assert vocab.OOV in np.asarray(fed.train.x) and vocab.OOV not in np.asarray(fed.train.y)


# ----------------------------------------------------------------------------- Parquet

def _png(img):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def test_parquet_femnist_hugging_face_layout(tmp_path):
  rng = np.random.default_rng(3)
  writers = ["f0000_14", "f0000_14", "f0003_33", "f0001_41", "f0003_33", "f0000_14"]
  imgs = _images(rng, len(writers))
  labels = rng.integers(0, 62, len(writers))
  table = pa.table({
      "image": pa.array([{"bytes": _png(i), "path": None} for i in imgs],
                        pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
      "writer_id": writers, "hsf_id": [0] * len(writers), "character": labels})
  os.makedirs(tmp_path / "data")
  pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
  pq.write_table(table.slice(0, 2), tmp_path / "data" / "test-00000-of-00001.parquet")
  fed = _load(f"parquet:{tmp_path}")
  assert list(fed.aux["client_ids"]) == ["f0000_14", "f0003_33", "f0001_41"]  # first seen
  assert np.asarray(fed.train.num_examples).tolist() == [3, 2, 1]
  assert np.asarray(fed.test.num_examples).tolist() == [2, 0, 0]
  x, y = _client_rows(fed.train, 1)  # rows 2 and 4, in file order
  np.testing.assert_allclose(x[..., 0], imgs[[2, 4]] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y, labels[[2, 4]])


def test_parquet_shakespeare_single_file_splits_each_client(tmp_path):
  roles = ["ROMEO", "JULIET", "ROMEO", "ROMEO", "JULIET", "NURSE", "ROMEO"]
  xs = [SPEECH[i: i + 80] for i in range(len(roles))]
  ys = [SPEECH[i + 80] for i in range(len(roles))]
  pq.write_table(pa.table({"character_id": roles, "x": xs, "y": ys}), tmp_path / "s.parquet")
  fed = _load(f"parquet:{tmp_path / 's.parquet'}", client_test_fraction=0.5, sequence_length=80)
  assert list(fed.aux["client_ids"]) == ["ROMEO", "JULIET", "NURSE"]
  assert (np.asarray(fed.train.num_examples) + np.asarray(fed.test.num_examples)).tolist() \
      == [4, 2, 1]
  mine = [i for i, r in enumerate(roles) if r == "ROMEO"]
  wx, wy = vocab.encode_pairs([xs[i] for i in mine], [ys[i] for i in mine], 80)
  got = np.concatenate([_client_rows(fed.train, 0)[0], _client_rows(fed.test, 0)[0]])
  assert sorted(map(tuple, got)) == sorted(map(tuple, wx))  # every row once, train or test
  with pytest.raises(DatasetError, match="client_column"):
    pq.write_table(pa.table({"speaker": roles, "x": xs, "y": ys}), tmp_path / "t.parquet")
    _load(f"parquet:{tmp_path / 't.parquet'}")
  assert _load(f"parquet:{tmp_path / 't.parquet'}", client_column="speaker").num_clients == 3


# ----------------------------------------------------------------------------- knobs, errors

def test_size_knobs_filter_cap_and_sample(tmp_path):
  rng = np.random.default_rng(4)
  sizes = {f"u{i}": n for i, n in enumerate([1, 8, 3, 12, 5, 9, 2, 6])}
  data = {u: {"x": rng.normal(size=(n, 3)).tolist(), "y": rng.integers(0, 4, n).tolist()}
          for u, n in sizes.items()}
  _write_leaf(str(tmp_path), data, "train")
  fed = _load(f"leaf:{tmp_path}", min_client_size=3, max_client_size=6,
              client_test_fraction=0.0)
  assert list(fed.aux["client_ids"]) == [u for u, n in sizes.items() if n >= 3]
  assert np.asarray(fed.train.num_examples).tolist() == [min(n, 6) for n in sizes.values()
                                                         if n >= 3]
  x, _ = _client_rows(fed.train, 0)  # u1's first six rows
  np.testing.assert_allclose(x, np.asarray(data["u1"]["x"][:6], np.float32))
  a = build_federated_data({"dataset": f"leaf:{tmp_path}", "max_clients": 4}, seed=0)
  b = build_federated_data({"dataset": f"leaf:{tmp_path}", "max_clients": 4}, seed=0)
  c = build_federated_data({"dataset": f"leaf:{tmp_path}", "max_clients": 4}, seed=1)
  ids = [list(d.aux["client_ids"]) for d in (a, b, c)]
  assert ids[0] == ids[1] and len(ids[0]) == 4 and set(ids[0]) <= set(sizes)
  assert ids[0] == [u for u in sizes if u in ids[0]]  # file order kept
  assert ids[0] != ids[2]  # another seed, another sample (of C(8, 4) = 70)
  with pytest.raises(DatasetError, match="min_client_size"):
    _load(f"leaf:{tmp_path}", min_client_size=50)


@pytest.mark.parametrize("dataset,command", [
    ("leaf:{}/nowhere", "preprocess.sh"),
    ("sqlite:{}/shakespeare_train.sqlite", "wget https://storage.googleapis.com/gresearch/fedjax"),
    ("parquet:{}/femnist.parquet", "load_dataset('flwrlabs/shakespeare'"),
])
def test_a_missing_file_names_the_command_that_prepares_it(tmp_path, dataset, command):
  with pytest.raises(DatasetError) as err:
    _load(dataset.format(tmp_path))
  msg = str(err.value)
  assert command in msg and "\n" not in msg and "--config.data.dataset=" in msg


def test_unsupported_layouts_say_what_is_supported(tmp_path):
  _write_leaf(str(tmp_path), {"celeb": {"x": ["000001.jpg"], "y": [1]}}, "train")  # CelebA
  with pytest.raises(DatasetError, match="supported: FEMNIST"):
    _load(f"leaf:{tmp_path}")
  _write_fedjax_sqlite(tmp_path / "so_train.sqlite",
                       {"u": {"tokens": np.array([b"a b"], dtype=object)}})
  with pytest.raises(DatasetError, match="snippets"):
    _load(f"sqlite:{tmp_path / 'so_train.sqlite'}")


def test_config_check_leaves_the_cohort_of_natural_clients_to_the_loaded_data():
  """``data.num_clients`` bounds K only where a partitioner makes that many clients."""
  from fedjax_sim.errors import ConfigError
  from fedjax_sim.launch.configs.base import get_base_config
  from fedjax_sim.launch.experiment import validate_config
  cfg = get_base_config()
  cfg.clients_per_round = cfg.data.num_clients + 1
  with pytest.raises(ConfigError, match="data.num_clients"):
    validate_config(cfg)  # digits: the partitioner makes data.num_clients clients
  for name in ("leaf:/data/femnist", "sqlite:/data/emnist.sqlite", "parquet:/data/x"):
    cfg.data.dataset = name
    validate_config(cfg)  # natural clients: data.num_clients is not read
  cfg.clients_per_round = 0
  with pytest.raises(ConfigError, match="clients_per_round=0"):
    validate_config(cfg)
