"""The next-character task: vocabulary and chunking, per-token loss and accuracy (against NumPy
statements), the char GRU, FedAvg's vectorized round against the per-client reference loop
on a tiny LEAF Shakespeare folder, and ``fedjax-sim run`` on it end to end.

Axis legend: C clients, K cohort, N examples, B batch, T sequence length, V vocabulary.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fedjax_sim import text
from fedjax_sim.client_data import ClientData
from fedjax_sim.data import text as vocab
from fedjax_sim.errors import ConfigError
from fedjax_sim.evaluation import make_evaluate, summarize
from fedjax_sim.protocol import FederatedAlgorithm, masked_cross_entropy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECH = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
          "the slings and arrows of outrageous fortune, or to take arms against a sea of "
          "troubles, and by opposing end them. ~ ") * 4
T = 16  # sequence length of the tests (LEAF's examples are 80 characters; the last T are kept)


def write_leaf_shakespeare(root, sizes=(9, 4, 14, 6, 3, 11), test_fraction=0.3):
  """A LEAF Shakespeare folder as preprocess.sh writes it: root/{train,test}/*.json, users
  ``PLAY_ROLE``, x 80-character windows of a speech, y the next character."""
  users = [f"HAMLET_ROLE{i}" for i in range(len(sizes))]
  for split, frac in (("train", 1.0), ("test", test_fraction)):
    os.makedirs(os.path.join(root, split), exist_ok=True)
    data = {}
    for i, (u, n) in enumerate(zip(users, sizes)):
      n = max(1, int(n * frac))
      off = 11 * i + (0 if split == "train" else 200)
      data[u] = {"x": [SPEECH[off + j: off + j + 80] for j in range(n)],
                 "y": [SPEECH[off + j + 80] for j in range(n)]}
    blob = {"users": users, "num_samples": [len(data[u]["y"]) for u in users], "user_data": data}
    with open(os.path.join(root, split, f"all_data_niid_0_keep_0_{split}_8.json"), "w") as f:
      json.dump(blob, f)
  return users


# ----------------------------------------------------------------------------- vocabulary

def test_vocabulary_is_fedjax_shakespeare_table():
  assert (vocab.PAD, vocab.BOS, vocab.EOS, vocab.OOV, vocab.VOCAB_SIZE) == (0, 1, 2, 89, 90)
  assert len(set(vocab.CHARS)) == 86
  ids = vocab.encode("dh\r~é")
  np.testing.assert_array_equal(ids, [3, 4, 88, 89, 89])  # ~ and é are not in the table
  assert vocab.decode(vocab.encode("To be, or not")) == "To be, or not"


def test_snippets_chunk_as_fedjax_with_skipped_targets():
  # fedjax/datasets/shakespeare.py preprocess_client's docstring, sequence_length=3:
  # inputs [[BOS, A, B], [C, D, EOS], [BOS, E, PAD]], outputs [[A, B, C], [D, EOS, BOS],
  # [E, EOS, PAD]]; the BOS and PAD targets are skipped here.
  a, b, c, d, e = vocab.encode("ABCDE")
  x, y = vocab.encode_snippets([b"ABCD", b"E"], 3)
  B, E, P, I = vocab.BOS, vocab.EOS, vocab.PAD, text.IGNORE
  np.testing.assert_array_equal(x, [[B, a, b], [c, d, E], [B, e, P]])
  np.testing.assert_array_equal(y, [[a, b, c], [d, E, I], [e, E, I]])


def test_leaf_pairs_shift_by_one_and_skip_oov_targets():
  x, y = vocab.encode_pairs(["hello~wor", "ab"], ["l", "c"], 5)
  assert vocab.decode(x[0]) == "o?wor" and vocab.decode(y[0]) == "_worl"  # OOV target skipped
  assert vocab.decode(x[1]) == "ab" and vocab.decode(y[1]) == "bc___"  # padded on the right
  np.testing.assert_array_equal(x[1, 2:], vocab.PAD)
  # Equal lengths (LEAF's 80 + 1) take one vectorized encode; it equals the per-example loop
  # that a batch of mixed lengths takes.
  xs, ys = [SPEECH[i:i + 80] for i in range(30)], [SPEECH[i + 80] for i in range(30)]
  fast = vocab.encode_pairs(xs, ys, T)
  loop = vocab.encode_pairs(xs + ["a"], ys + ["b"], T)
  for f, s in zip(fast, loop):
    np.testing.assert_array_equal(f, s[:30])


# ----------------------------------------------------------------------------- metrics

def _random_tokens(rng, b=6, t=7, v=5):
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  labels = rng.integers(0, v, (b, t)).astype(np.int32)
  labels[rng.random((b, t)) < 0.3] = text.IGNORE
  mask = np.arange(b) < b - 2
  return logits, labels, mask


def _np_token_stats(logits, labels, mask):
  """NumPy: (sum CE, correct, counted tokens) over real rows' targets >= 0."""
  w = mask[:, None] & (labels >= 0)
  logz = np.log(np.exp(logits).sum(-1))
  ce = logz - np.take_along_axis(logits, np.maximum(labels, 0)[..., None], -1)[..., 0]
  correct = (logits.argmax(-1) == labels) & w
  return float((ce * w).sum()), float(correct.sum()), float(w.sum())


def test_sequence_loss_is_the_mean_over_counted_tokens():
  logits, labels, mask = _random_tokens(np.random.default_rng(0))
  ce_sum, _, count = _np_token_stats(logits, labels, mask)
  got = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), ce_sum / count, rtol=1e-6)
  # A skipped target's logits get no gradient.
  g = jax.grad(lambda z: masked_cross_entropy(z, jnp.asarray(labels), jnp.asarray(mask)))(
      jnp.asarray(logits))
  skipped = ~(mask[:, None] & (labels >= 0))
  assert np.all(np.asarray(g)[skipped] == 0) and np.any(np.asarray(g)[~skipped] != 0)
  # Classification labels [B] keep the row mean.
  lg, lb = jnp.asarray(logits[:, 0]), jnp.asarray(np.maximum(labels[:, 0], 0))
  ce = -jax.nn.log_softmax(lg)[jnp.arange(6), lb]
  np.testing.assert_allclose(float(masked_cross_entropy(lg, lb, jnp.asarray(mask))),
                             float(jnp.sum(ce * mask) / mask.sum()), rtol=1e-6)


def test_evaluation_counts_tokens_per_client_and_globally():
  rng = np.random.default_rng(1)
  v, t = 5, 7
  w_out = rng.normal(size=(v, v)).astype(np.float32)
  apply_fn = lambda params, x: params[jax.nn.one_hot(x.astype(jnp.int32), v).argmax(-1)]
  alg = FederatedAlgorithm(name="t", init=None, init_client=None, client_update=None,
                           server_update=None, eval_params=lambda s, c: s, apply_fn=apply_fn)
  xs = rng.integers(0, v, (3, 4, t)).astype(np.int32)
  ys = rng.integers(0, v, (3, 4, t)).astype(np.int32)
  ys[rng.random((3, 4, t)) < 0.3] = text.IGNORE
  sizes = np.array([4, 2, 3], np.int32)
  mask = np.arange(4)[None] < sizes[:, None]
  test = ClientData(jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(mask), jnp.asarray(sizes))
  gx, gy = xs[mask], ys[mask]
  raw = make_evaluate(alg, batch_size=4)(jnp.asarray(w_out), jnp.zeros(3), test,
                                         jnp.asarray(gx), jnp.asarray(gy))
  for k in range(3):
    _, correct, count = _np_token_stats(w_out[xs[k]], ys[k], mask[k])
    assert float(raw["client_correct"][k]) == correct and float(raw["client_count"][k]) == count
  ce_sum, correct, count = _np_token_stats(w_out[gx], gy, np.ones(len(gy), bool))
  out = summarize(raw, len(gy))
  np.testing.assert_allclose(out["test_accuracy"], correct / count, rtol=1e-6)
  np.testing.assert_allclose(out["test_loss"], ce_sum / count, rtol=1e-5)


def test_char_gru_maps_tokens_to_per_position_logits():
  model = text.CharGRU(num_classes=vocab.VOCAB_SIZE, hidden=(8, 6))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, T)))["params"]
  x = jnp.asarray(vocab.encode_pairs([SPEECH[:80]], [SPEECH[80]], T)[0])
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, return_embedding=True))
  logits, z = apply(params, x)
  assert logits.shape == (1, T, vocab.VOCAB_SIZE) and z.shape == (1, T, 6)
  assert params["Embed_0"]["embedding"].shape == (vocab.VOCAB_SIZE, 8)  # embedding 8
  # Causal: position t's logits do not depend on later tokens.
  later, _ = apply(params, x.at[0, 5:].set(7))
  np.testing.assert_allclose(later[0, :5], logits[0, :5], rtol=1e-6)
  assert not np.allclose(later[0, 5:], logits[0, 5:])
  with pytest.raises(ConfigError, match=r"char_gru reads token ids \[B, T\].*leaf:"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))  # digits images


# ----------------------------------------------------------------------------- rounds

def _leaf_config(root):
  c = tiny_config(rounds=2, clients_per_round=3, chunk_size=2, rounds_per_call=1, batch_size=4,
                  model="char_gru", client_lr=0.5)
  c.data.dataset = f"leaf:{root}"
  c.data.sequence_length = T
  c.data.max_client_size = 12
  c.model_kwargs.hidden = (8,)
  return c


def test_fedavg_round_equals_reference_loop_on_leaf_shakespeare(tmp_path):
  from fedjax_sim.launch.experiment import build_experiment
  from fedjax_sim.reference import make_reference_round
  from fedjax_sim.round import init_state, make_round
  write_leaf_shakespeare(str(tmp_path))
  exp = build_experiment(_leaf_config(str(tmp_path)))
  data = exp.data.train
  assert data.y.shape == (6, 12, T) and exp.data.num_classes == vocab.VOCAB_SIZE
  state0 = init_state(exp.algorithm, exp.sampler, 6, seed=0, mesh=exp.mesh)
  vec = make_round(exp.algorithm, exp.sampler, seed=0, mesh=exp.mesh, chunk_size=2,
                   donate=False)  # K = 3 in 2 chunks of 2: one padding slot
  ref = make_reference_round(exp.algorithm, exp.sampler, seed=0, sort_by_size=True)
  got = want = state0
  for r in range(2):
    got, metrics = vec(got, data)
    want, ref_metrics = ref(want, data)
    for a, b in zip(jax.tree.leaves(got.server), jax.tree.leaves(want.server)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                 err_msg=f"round {r}")
    np.testing.assert_allclose(metrics["useful_examples"], ref_metrics["useful_examples"])
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(got.server), jax.tree.leaves(state0.server)))


def test_cli_trains_fedavg_on_a_leaf_folder(tmp_path):
  write_leaf_shakespeare(str(tmp_path / "shakespeare"))
  work = tmp_path / "run"
  cmd = [sys.executable, "-m", "fedjax_sim.launch.main", "run",
         f"--config.data.dataset=leaf:{tmp_path / 'shakespeare'}", "--config.model=char_gru",
         "--config.model_kwargs.hidden=(8,)", f"--config.data.sequence_length={T}",
         "--config.data.max_client_size=12", "--config.clients_per_round=3",
         "--config.batch_size=4", "--config.rounds=4", "--config.eval_every=2",
         "--config.rounds_per_call=2", "--config.client_lr=1.0", "--config.progress=false",
         f"--workdir={work}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["round"] for r in rows] == [0, 2, 4]
  assert rows[-1]["train_loss"] < np.log(vocab.VOCAB_SIZE)  # below a uniform guess
  assert rows[-1]["test_loss"] < rows[0]["test_loss"]
  assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"]
