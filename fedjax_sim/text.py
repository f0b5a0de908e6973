"""Sequence (next-token) tasks: the ignored-target convention, token metrics and a char GRU.

A sequence task stores one example as input ids x int32 [T] and target ids
y int32 [T] (y[t] is the token after x[t]); a client's ClientData is x [N, T],
y [N, T], mask [N]. The model maps x [B, T] to logits [B, T, V]. The loss and
the accuracy are per token, over the tokens of real rows (mask True) whose
target is >= 0: a target of :data:`IGNORE` (-1) is skipped. The data side
writes IGNORE where FedJAX and TFF skip a target: padding, out-of-vocabulary
and beginning-of-sequence tokens (``fedjax_sim.data.text``).

FedJAX's character and word models (``fedjax/models/shakespeare.py``,
``stackoverflow.py``) mask PAD targets out of the training loss, and their
``accuracy_in_vocab`` counts no PAD/EOS target and never credits a predicted
PAD/BOS/EOS/OOV token (logits mask), so an OOV target is always wrong there;
TFF's Shakespeare task masks PAD, OOV, BOS and EOS targets out of its
accuracy. We skip PAD, OOV and BOS targets in both the loss and the accuracy
and keep EOS (it is a real, predictable event).

Model: :class:`CharGRU`, the character model of McMahan et al., arXiv
1602.05629, Sec. 3 (embedding 8, two recurrent layers of 256; an LSTM there,
a GRU here), registered as ``char_gru`` in :data:`fedjax_sim.models.MODELS`.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_sim.errors import ConfigError

__all__ = ["IGNORE", "CharGRU", "token_weights", "token_cross_entropy", "token_correct"]

IGNORE = -1  # target id skipped by the loss and the accuracy (padding, OOV, BOS targets)


def token_weights(labels: jax.Array, mask: jax.Array) -> jax.Array:
  """float32 [B, T]: 1 for the tokens that count (real row, target >= 0), else 0.

  Args:
    labels: int32 [B, T] target ids (:data:`IGNORE` for skipped targets).
    mask: bool [B]: True for real rows.
  """
  row = mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim))
  return (row & (labels >= 0)).astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """float32 [B, T]: softmax cross-entropy per token (0 where the target is :data:`IGNORE`'s).

  Args: logits float32 [B, T, V]; labels int32 [B, T].
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  return jnp.where(labels >= 0, ce, 0.0)


def token_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """bool [B, T]: the argmax prediction equals the target (never for an :data:`IGNORE` one).

  Args: logits float32 [B, T, V]; labels int32 [B, T].
  """
  return jnp.argmax(logits, -1) == labels


class CharGRU(nn.Module):
  """Next-character model: embedding, stacked GRU layers, a per-position classifier.

  McMahan et al., arXiv 1602.05629, Sec. 3 (Shakespeare): an 8-dimensional
  character embedding and a two-layer recurrent network of 256 units, then a
  dense layer to the vocabulary at every position (they use LSTM cells; FedJAX
  and LEAF do too; a GRU has 3/4 of the parameters and the same interface).

  Attributes:
    num_classes: V, the vocabulary size (input and output ids are in [0, V)).
    embed_dim: the embedding width (8 in the paper).
    hidden: the widths of the recurrent layers, first to last.

  Input x: token ids [B, T] (int32, or float32 holding integers); output
  logits float32 [B, T, V] (with ``return_embedding=True`` also the last
  layer's states float32 [B, T, hidden[-1]]).

  Raises:
    ConfigError: x is not 2-D (e.g. images: the model needs a next-character dataset).
  """
  num_classes: int
  embed_dim: int = 8
  hidden: Sequence[int] = (256, 256)

  @nn.compact
  def __call__(self, x, return_embedding: bool = False):
    if x.ndim != 2:
      raise ConfigError(f"char_gru reads token ids [B, T], not x of shape {tuple(x.shape)}; use "
                       "a next-character dataset (--config.data.dataset=leaf:<Shakespeare "
                       "folder>, sqlite:<path> or parquet:<path>) or another --config.model")
    tokens = x.astype(jnp.int32)
    z = nn.Embed(self.num_classes, self.embed_dim)(tokens)  # [B, T, embed_dim]
    for h in self.hidden:
      z = nn.RNN(nn.GRUCell(features=h))(z)  # [B, T, h]
    logits = nn.Dense(self.num_classes)(z)
    return (logits, z) if return_embedding else logits
