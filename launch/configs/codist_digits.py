"""CODIST (arXiv 2310.02549; algorithms/codist.py) on the embedded digits data.

Two capacity pools over 50 clients, Dir(0.5): the small model (``mlp_s``,
64-10) trains with FedAvg on all clients (K = 10 per round), the large model
(``mlp_l``, 512-256-128-10) on the 30% high-capacity clients (K = 5 of 15);
FedAdam server optimizer (lr 3e-3, b1 0.9, b2 0.99, tau 1e-3) per model;
E = 2, B = 10, client SGD lr 0.05; 100 rounds. Distillation on 250 unlabeled
server examples, T = 2, Adam lr 1e-4, B_d = 64: MERGED s = 5 every round
(alpha = 0.3), PERIODIC s = 50 every p = 10 rounds (the same distillation
steps in total).

  fedjax-sim run --config=launch/configs/codist_digits.py --workdir=runs/codist_digits
  fedjax-sim run --config=launch/configs/codist_digits.py:periodic
  fedjax-sim run --config=launch/configs/codist_digits.py:fedavg --config.codist.large_fraction=0.5

Variants (``:arg``): ``merged`` (default), ``periodic``, ``fedavg`` (no
distillation), ``smoke`` (5 rounds), ``domain_shift`` (the report's setting;
the class-split data are built by the driver only). ``c.codist`` holds the
knobs that differ from ``codist(...)``'s defaults (the signature states each
default once; ``fedjax_sim.launch.experiment.complete_config`` fills in the
rest). The pools are ``c.archs`` = (small, large). Through the CLI the server
set is held out of the clients' training rows by the data pipeline
(``c.data.server_size``, ``fedjax_sim.data.server_sets.server_holdout``); the
report's runs use the driver ``launch/experiments/codist_digits.py``, which
builds the clients' data and the held-out server sets itself
(``fedjax_sim.data.build_codist_data``) and evaluates both global models on the
global test set.
"""
import ml_collections

from fedjax_sim.launch.configs.base import get_base_config


def get_config(arg: str = ""):
  c = get_base_config()
  c.algorithm = "codist"
  c.rounds = 100
  c.archs = ("mlp_s", "mlp_l")  # the small model (all clients), the large one (high-capacity)
  c.data.num_clients = 50
  c.data.partition = "dirichlet"
  c.data.alpha = 0.5
  c.data.server_size = 250  # N_s unlabeled server examples, held out of the clients' data
  c.data.server_seed = 0
  c.clients_per_round = 10  # K of the small pool (all clients)
  c.local_epochs = 2
  c.batch_size = 10
  c.client_lr = 0.05
  c.server_optimizer = "adam"
  c.server_lr = 3e-3
  c.server_b1, c.server_b2, c.server_tau = 0.9, 0.99, 1e-3
  c.eval_every = 10
  c.chunk_size = 0
  c.codist = ml_collections.ConfigDict({
      "alpha": 0.3,  # MERGED weight of Delta_distill
      "distill_lr": 1e-4,  # Adam
  })
  mode = arg.split(",")[0] if arg else "merged"
  if mode in ("merged", "periodic", "fedavg"):
    c.codist.mode = mode
    if mode == "periodic":
      c.codist.distill_steps = 50  # s per distillation every p = 10 rounds
  elif mode == "domain_shift":  # the report's domain-shift data (driver only)
    c.data.domain_classes = ((0, 1, 2, 3), (4, 5, 6, 7))  # classes of the large / small pool
    c.data.ood_classes = (8, 9)  # held by no client: the out-of-domain server set
  elif mode != "smoke":
    raise ValueError(f"unknown variant ':{arg}'; use merged, periodic, fedavg, domain_shift "
                     "or smoke.")
  if "smoke" in arg.split(","):
    c.rounds, c.eval_every, c.checkpoint_every, c.rounds_per_call = 5, 5, 5, 5
  return c
