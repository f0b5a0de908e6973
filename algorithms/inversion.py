"""Representation-inversion attack: how much of a client's private inputs can be
rebuilt from what an algorithm uploads (FedRE, arXiv 2511.22265, privacy table:
representations (FedAllRep) vs prototypes (FedGH / FedProto) vs entangled
representations (FedRE); PSNR lower / MSE higher = more private).

Threat model [ours; the paper gives no details we could read]: an
honest-but-curious server that can query client k's extractor + RM (the
strongest reading: white-box access to g_k) trains a decoder
``dec_k: R^D -> inputs`` on PUBLIC data (pairs (RM[g_k(x)], x) for x in a
public set disjoint from every client's data; on digits: the global test
split, which pooled algorithms never train or evaluate on), by MSE with Adam.
It then decodes every uploaded vector:

* ``representations``: each upload RM[g_k(x_i)] is compared with its x_i;
* ``prototypes``: p_c is compared with every private example of class c;
* ``entangled``: r~_k = sum_i w_i RM[g_k(x_i)] (RAP weights, fresh draws) is
  compared with every contributing example, weighted by w_i;
* ``prior``: a no-information baseline that "reconstructs" every example as
  the mean public image.

Scores per (reconstruction, target) pair, averaged with the pair weights:
MSE over pixels (inputs in [0, 1]) and PSNR = 10 log10(1 / MSE) dB; ``best_``
scores take, per reconstruction, the closest target (the attacker's luckiest
match). Inputs are float32 [P or N, *input_shape]; z float32 [., D].
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithms.fedre import entangle_weights


def init_decoder(rng: jax.Array, dim: int, out: int, hidden: Sequence[int] = (256, 256)) -> list:
  """MLP params [(W [in, out], b [out]), ...] from D to ``out`` pixels."""
  sizes = [dim, *hidden, out]
  keys = jax.random.split(rng, len(sizes) - 1)
  return [(jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), jnp.zeros((b,)))
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def decode(params: list, z: jax.Array, stats: tuple) -> jax.Array:
  """Reconstructions float32 [M, F] in [0, 1] from z float32 [M, D] (stats: z mean/std)."""
  h = (z - stats[0]) / stats[1]
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return jax.nn.sigmoid(h @ w + b)


def train_decoder(z_pub: jax.Array, x_pub: jax.Array, rng: jax.Array, *, steps: int = 1500,
                  lr: float = 1e-3, batch_size: int = 128,
                  hidden: Sequence[int] = (256, 256)) -> tuple[list, tuple]:
  """Fits dec(z) ~ x on public pairs (z_pub [P, D], x_pub [P, ...]) by minibatch Adam on MSE.

  Returns (decoder params, z standardization stats).
  """
  x = x_pub.reshape(x_pub.shape[0], -1)
  stats = (z_pub.mean(0), z_pub.std(0) + 1e-6)
  params = init_decoder(rng, z_pub.shape[1], x.shape[1], hidden)
  params = _fit(params, z_pub, x, stats, jax.random.fold_in(rng, 1), steps=steps, lr=lr,
                batch_size=batch_size)
  return params, stats


@functools.partial(jax.jit, static_argnames=("steps", "lr", "batch_size"))
def _fit(params, z_pub, x, stats, rng, *, steps, lr, batch_size):
  """Adam on MSE; one compiled program for every client with the same shapes."""
  opt = optax.adam(lr)

  def step(carry, k):
    p, s = carry
    idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
    loss, g = jax.value_and_grad(
        lambda p: jnp.mean((decode(p, z_pub[idx], stats) - x[idx]) ** 2))(p)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), loss

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(rng, steps))
  return params


def pair_scores(recon: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> dict[str, float]:
  """Scores of reconstructions vs targets.

  Args:
    recon: float [M, F].  targets: float [T, F].
    weights: float [M, T], weight of target t for reconstruction m (rows sum to
      1 over the targets it is compared with; 0 = not compared).

  Returns:
    mse, psnr (weighted means over pairs, then over reconstructions) and
    best_mse, best_psnr (per reconstruction the closest compared target).
  """
  mse = ((recon[:, None, :] - targets[None, :, :]) ** 2).mean(-1)  # [M, T]
  psnr = 10 * np.log10(1.0 / np.maximum(mse, 1e-10))
  w = weights / np.maximum(weights.sum(1, keepdims=True), 1e-12)
  best = np.where(weights > 0, mse, np.inf).min(1)
  return {"mse": float((w * mse).sum(1).mean()), "psnr": float((w * psnr).sum(1).mean()),
          "best_mse": float(best.mean()),
          "best_psnr": float((10 * np.log10(1.0 / np.maximum(best, 1e-10))).mean())}


def attack_client(features: Callable[[Any, jax.Array], jax.Array], params: Any,
                  x_priv: np.ndarray, y_priv: np.ndarray, x_pub: np.ndarray, rng: jax.Array, *,
                  num_classes: int, entangle_draws: int = 8, decoder_steps: int = 1500,
                  forms: Sequence[str] = ("representations", "prototypes", "entangled", "prior"),
                  ) -> dict[str, dict[str, float]]:
  """Attacks ONE client's uploads; returns {form: scores} (see :func:`pair_scores`).

  Args:
    features: ``(params, x [B, ...]) -> float32 [B, D]`` (the client's RM[g_k]).
    params: the client's model params.
    x_priv, y_priv: its REAL private training rows [N, ...], [N].
    x_pub: public inputs [P, ...] for the decoder.
    entangle_draws: fresh RAP weight draws decoded (one upload per round each).
  """
  z_pub = features(params, jnp.asarray(x_pub))
  dec, stats = train_decoder(z_pub, jnp.asarray(x_pub), rng, steps=decoder_steps)
  z = np.asarray(features(params, jnp.asarray(x_priv)))
  tgt = x_priv.reshape(len(x_priv), -1)
  rec = lambda zz: np.asarray(decode(dec, jnp.asarray(zz, jnp.float32), stats))
  n = len(y_priv)
  out = {}
  if "representations" in forms:
    out["representations"] = pair_scores(rec(z), tgt, np.eye(n))
  if "prototypes" in forms:
    classes = np.unique(y_priv)
    onehot = (y_priv[None, :] == classes[:, None]).astype(np.float64)  # [Cp, N]
    protos = onehot @ z / onehot.sum(1, keepdims=True)
    out["prototypes"] = pair_scores(rec(protos), tgt, onehot)
  if "entangled" in forms:
    ws = np.stack([np.asarray(entangle_weights(
        jax.random.fold_in(rng, 100 + d), jnp.asarray(y_priv), jnp.ones(n, bool),
        variant="RAP", num_classes=num_classes)) for d in range(entangle_draws)])  # [M, N]
    out["entangled"] = pair_scores(rec(ws @ z), tgt, ws)
  if "prior" in forms:
    mean_img = x_pub.reshape(len(x_pub), -1).mean(0, keepdims=True)
    out["prior"] = pair_scores(mean_img, tgt, np.ones((1, n)))
  return out
