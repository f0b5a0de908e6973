"""Shared readers of a run config for the algorithm builders.

The registry (``fedjax_sim/algorithms/__init__.py``) and the builders that
live in their method's module (CoRe-Fed, CODIST, ...) read the same
client-training and server-optimizer knobs; they import them from here, not
from the package, so no algorithm module imports the package that imports it
(``tests/test_architecture.py`` checks there is no import cycle).
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from fedjax_sim import models
from fedjax_sim.algorithms.fedavg import server_optimizer


def client_kwargs(cfg) -> dict:
  """Local-training keyword arguments (client_lr, batch_size, epochs, local_steps,
  client_momentum, lr_decay) from the run config."""
  return dict(client_lr=cfg.client_lr, batch_size=cfg.batch_size, epochs=cfg.local_epochs,
              local_steps=cfg.local_steps, client_momentum=cfg.client_momentum,
              lr_decay=cfg.lr_decay)


def server_opt(cfg, name=None):
  """The server optimizer named by ``name`` (default ``cfg.server_optimizer``), with
  ``server_lr``, ``server_b1``, ``server_b2``, ``server_tau`` from the run config."""
  return server_optimizer(name or cfg.server_optimizer, cfg.server_lr, cfg.server_b1,
                          cfg.server_b2, cfg.server_tau)


def embedding_fn(cfg: Any, init_params: Callable) -> tuple[Callable, int]:
  """``(embed_fn, D)`` for representation methods, from ``cfg.model``.

  The engine hands builders ``apply_fn(params, x) -> logits`` only; every model
  in ``fedjax_sim.models`` also returns the penultimate embedding with
  ``return_embedding=True``. The model is rebuilt from ``cfg.model`` and
  ``cfg.model_kwargs``; the number of classes L and D are read off the
  classifier (the last top-level ``Dense_<i>``, kernel [D, L]) of
  ``init_params``'s shapes. ``embed_fn(params, x [B, ...]) -> (logits [B, L],
  z float32 [B, D])``.
  """
  shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  dense = [k for k in shapes if k.startswith("Dense_") and k[6:].isdigit()]
  if not dense:
    raise ValueError(f"model '{cfg.model}' has no top-level Dense classifier to read D from.")
  dim, num_classes = shapes[max(dense, key=lambda k: int(k[6:]))]["kernel"].shape
  model = models.build_model(cfg.model, num_classes, **dict(cfg.model_kwargs))
  return (lambda p, x: model.apply({"params": p}, x, return_embedding=True)), int(dim)
