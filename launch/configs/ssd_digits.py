"""Federated self-supervised learning on digits: FedAlignUniform, FedSimCLR, SSD.

SSD is arXiv 2508.01251 (``docs/decisions.md#ssd``). Variants (``:arg``):

* ``silo``   (default): cross-silo, 10 clients, all 10 join every round, 30 rounds, E = 2, B = 32.
* ``device``: cross-device, 100 clients, 10 per round, 40 rounds, E = 5, B = 16.
* ``smoke``: a seconds-long silo run.

Pick the method with ``--config.algorithm`` (``ssd`` default, ``fedalignuniform``,
``fedsimclr``), the partition with ``--config.data.alpha`` (Dir(0.1) default),
SSD's knobs with ``--config.ssd.beta/gamma/delta`` (SSD without PD:
``delta=0``; without DSR: ``gamma=0``).

Entry point for results: the experiment script, which evaluates the
representation (uniformity, alignment, k-NN and linear-probe accuracy)::

  python -m fedjax_sim.launch.experiments.ssd_digits --out=docs/results

``fedjax-sim run --config=launch/configs/ssd_digits.py`` trains, checkpoints and
evaluates these methods with their own representation metrics (the algorithm's
``evaluate`` hook: k-NN and linear-probe accuracy, global/local/test
uniformity), logged to ``metrics.jsonl`` and printed at the end.
"""
import ml_collections

from fedjax_sim.launch.configs.base import get_base_config


def get_config(arg: str = "silo"):
  arg = arg or "silo"
  if arg not in ("silo", "device", "smoke"):
    raise ValueError(f"unknown variant '{arg}'; use ssd_digits.py:silo, :device or :smoke.")
  c = get_base_config()
  c.algorithm = "ssd"
  c.client_lr = 0.05
  c.client_momentum = 0.9
  c.data.dataset = "digits"
  c.data.partition = "dirichlet"
  c.data.alpha = 0.1
  c.data.client_test_fraction = 0.0  # SSL evaluates on the global test set only
  c.data.min_examples = 2
  c.chunk_size = 0
  if arg in ("silo", "smoke"):
    c.data.num_clients = 10
    c.clients_per_round = 10
    c.rounds = 30
    c.local_epochs = 2
    c.batch_size = 32
    c.eval_every = 5
    c.chunk_size = 5
  else:
    c.data.num_clients = 100
    c.clients_per_round = 10
    c.rounds = 40
    c.local_epochs = 5
    c.batch_size = 16
    c.eval_every = 10
    # Dir(0.1) over 100 clients cannot give every client 2 of digits' 1,347
    # training examples (1000 draws fail for seeds 0-2); 1 works.
    c.data.min_examples = 1
  if arg == "smoke":
    c.rounds = 4
    c.local_epochs = 1
    c.eval_every = 2
  c.rounds_per_call = c.eval_every
  c.checkpoint_every = c.rounds

  # SSD's knobs (--config.ssd.*) are the defaults of algorithms/ssd.py's ssd() and fed_ssl()
  # and of the encoder + projector (SSLModel): MLP encoder 64-256-128 (D = 128), projector
  # 128-256-128, weight decay 1e-4, cosine decay, digit-safe augmentations (no flips),
  # beta 1 (uniformity), gamma 1 (DSR), delta 0.1 (PD), t 2, DSR scale sqrt(10), PD
  # temperature 0.5, basis seed 0. FedSimCLR's NT-Xent tau (--config.fedsimclr.tau) is 0.5.
  # Evaluation (the experiment script): k-NN and linear-probe settings.
  c.ssl_eval = ml_collections.ConfigDict(dict(knn_k=20, knn_t=0.1, probe_steps=500))
  return c
