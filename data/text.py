"""The character vocabulary of the Shakespeare next-character task, and sequence encoding.

Vocabulary: FedJAX's and TFF's Shakespeare table (``fedjax/datasets/
shakespeare.py``, from the TFF text-generation tutorial): ids 0, 1, 2 are
PAD, BOS, EOS; the 86 characters of :data:`CHARS` get ids 3..88 in that
order; every other character is OOV = 89; V = :data:`VOCAB_SIZE` = 90.

Two example layouts become (x, y) id pairs of length T (``sequence_length``):

* LEAF / flwr-datasets (:func:`encode_pairs`): an example is an 80-character
  string ``x`` and the next character ``y``; s = x + y, input s[:-1], target
  s[1:] (every position predicts its next character), cut to the last T and
  padded on the right.
* FedJAX SQLite snippets (:func:`encode_snippets`): a client's snippets are
  joined, each as BOS, its characters, EOS, and the joined sequence is cut
  into consecutive chunks of T (input) with the sequence shifted by one as
  target, the last chunk padded: FedJAX's ``shakespeare.preprocess_client``.

Targets that :mod:`fedjax_sim.text` skips are written as ``IGNORE`` (-1):
PAD, BOS and OOV targets (see that module for how this relates to FedJAX's
and TFF's masks). Inputs keep every id (an OOV input is still a token).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from fedjax_sim.text import IGNORE

__all__ = ["BOS", "CHARS", "EOS", "OOV", "PAD", "VOCAB_SIZE", "decode", "encode",
           "encode_pairs", "encode_snippets", "targets"]

CHARS = ("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159"
         "\r")
PAD, BOS, EOS = 0, 1, 2
NUM_RESERVED = 3
OOV = NUM_RESERVED + len(CHARS)
VOCAB_SIZE = OOV + 1

_TABLE = np.full(257, OOV, np.int32)  # byte (or 256: any code point above 255) -> id
for _i, _c in enumerate(CHARS.encode("latin-1")):
  _TABLE[_c] = NUM_RESERVED + _i
_SKIP = np.zeros(VOCAB_SIZE, bool)
_SKIP[[PAD, BOS, OOV]] = True


def encode(text: str | bytes) -> np.ndarray:
  """int32 [len]: the ids of a string's characters (non-ASCII and unlisted ones -> OOV).

  A ``str`` is encoded per character (any character above U+00FF is OOV); ``bytes`` per byte.
  """
  if isinstance(text, str):
    if text.isascii():
      return _TABLE.take(np.frombuffer(text.encode("ascii"), np.uint8))
    return _TABLE[np.minimum(np.frombuffer(text.encode("utf-32-le"), np.uint32), 256)]
  return _TABLE[np.frombuffer(bytes(text), np.uint8)]


def decode(ids: Iterable[int]) -> str:
  """The characters of ids (PAD, BOS, EOS, OOV and IGNORE as ``''``, ``'^'``, ``'$'``, ``'?'``,
  ``'_'``): for reading, not an inverse of :func:`encode` on OOV."""
  special = {PAD: "", BOS: "^", EOS: "$", OOV: "?", IGNORE: "_"}
  return "".join(special[i] if i in special else CHARS[i - NUM_RESERVED] for i in map(int, ids))


def targets(ids: np.ndarray) -> np.ndarray:
  """int32 like ``ids``: target ids with PAD, BOS and OOV replaced by ``IGNORE``."""
  ids = np.asarray(ids, np.int32)
  return np.where(_SKIP.take(ids), IGNORE, ids).astype(np.int32)


def encode_pairs(xs: Sequence[str], ys: Sequence[str], sequence_length: int = 80
                 ) -> tuple[np.ndarray, np.ndarray]:
  """LEAF next-character examples -> (x int32 [N, T], y int32 [N, T]).

  Example k: s = xs[k] + ys[k]; x = ids of s[:-1], y = target ids of s[1:]
  (:func:`targets`); the last T positions are kept, shorter ones padded on the
  right (x PAD, y IGNORE).

  Raises:
    ValueError: different numbers of xs and ys, or sequence_length < 1.
  """
  if len(xs) != len(ys):
    raise ValueError(f"{len(xs)} inputs but {len(ys)} next characters.")
  if sequence_length < 1:
    raise ValueError(f"sequence_length={sequence_length} must be >= 1.")
  t = int(sequence_length)
  x = np.full((len(xs), t), PAD, np.int32)
  y = np.full((len(xs), t), IGNORE, np.int32)
  lens = np.fromiter((len(a) + len(b) for a, b in zip(xs, ys)), np.int64, len(xs))
  if len(xs) and lens.min() == lens.max() >= 2:  # LEAF: every example 80 + 1 characters
    s = encode("".join(a + b for a, b in zip(xs, ys))).reshape(len(xs), -1)[:, -(t + 1):]
    x[:, :s.shape[1] - 1] = s[:, :-1]
    y[:, :s.shape[1] - 1] = targets(s[:, 1:])
    return x, y
  for k, (a, b) in enumerate(zip(xs, ys)):
    s = encode(a + b)[-(t + 1):]
    n = len(s) - 1
    if n > 0:
      x[k, :n] = s[:-1]
      y[k, :n] = targets(s[1:])
  return x, y


def encode_snippets(snippets: Sequence[str | bytes], sequence_length: int = 80
                    ) -> tuple[np.ndarray, np.ndarray]:
  """One client's text snippets -> (x int32 [M, T], y int32 [M, T]) as FedJAX chunks them.

  The snippets are joined as BOS s_1 EOS BOS s_2 EOS ...; input = joined[:-1],
  target = joined[1:] (:func:`targets`: BOS/OOV targets -> IGNORE), both cut
  into M = ceil((len - 1) / T) rows of T, the last padded (x PAD, y IGNORE).
  FedJAX's ``shakespeare.preprocess_client``, with its PAD/BOS/OOV targets skipped.

  Raises:
    ValueError: sequence_length < 1.
  """
  if sequence_length < 1:
    raise ValueError(f"sequence_length={sequence_length} must be >= 1.")
  t = int(sequence_length)
  parts = []
  for s in snippets:
    parts += [np.array([BOS], np.int32), encode(s), np.array([EOS], np.int32)]
  joined = np.concatenate(parts) if parts else np.zeros(0, np.int32)
  n = max(len(joined) - 1, 0)
  m = -(-n // t)
  x = np.full(m * t, PAD, np.int32)
  y = np.full(m * t, IGNORE, np.int32)
  x[:n] = joined[:-1]
  y[:n] = targets(joined[1:])
  return x.reshape(m, t), y.reshape(m, t)
