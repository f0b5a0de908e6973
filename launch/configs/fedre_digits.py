"""FedRE (arXiv 2511.22265) and its baselines on the embedded digits data.

``docs/decisions.md#fedre``: 10 clients that all join, E = 1, client lr 0.06,
batch 32, 75/25 per-client train/test split, PRA = Dir(0.1), PAT = 2 classes
per client, architectures round-robin over a model family (ours: 5 small
MODEL_ZOO models), RM = average pooling to D = 32, RAP weights, server head
trained 1 epoch SGD lr 0.01 batch 32.

  fedjax-sim run --config=launch/configs/fedre_digits.py --workdir=runs/fedre_digits

Variants (``:arg``, combinable with ``,``): ``pat`` (pathological partition
instead of PRA), ``c100k10`` / ``c100k20`` (100 clients, 10 or 20 per round),
``smoke`` (seconds), ``mnist1d`` (MNIST-1D, arXiv 2011.14439: 100 clients, 20
per round unless ``c100k10``, Dir(0.5) (``dir05``, its default partition), B = 10, the 1-D
architectures :data:`ARCHS_MNIST1D`; ``docs/results/fedre_mnist1d.md``), ``c10`` with
``mnist1d`` (the paper's main setting on MNIST-1D: 10 clients, all join, B = 32; use with
``pra`` or ``pat``). Pick the method
with ``--config.algorithm`` (fedre, fedproto, fedgh, fedallrep, lg_fedavg, local_pools,
fedkd, fedgen, fedtgp, fedmrl); FedRE's knobs live in ``--config.fedre.*`` (variant
RSR|VAR|RAR|RSP|VAP|RAP, weights uniform|gaussian|laplacian, rm avg|max|fc, dim, resample,
server_*).
The report is made by ``python launch/experiments/fedre_digits.py``.
"""
from fedjax_sim.launch.configs.base import get_base_config

ARCHS = ("mlp_s", "mlp_m", "mlp_l", "cnn_s", "resnet_s")
ARCHS_MNIST1D = ("mlp_s", "mlp_m", "cnn1d_s", "gru_s")  # MODEL_ZOO models for 1-D signals


def get_config(arg: str = ""):
  opts = {a for a in (arg or "").split(",") if a}
  unknown = opts - {"pat", "pra", "dir05", "c100k10", "c100k20", "c10", "smoke", "mnist1d"}
  if unknown:
    raise ValueError(f"unknown variant(s) {sorted(unknown)}; use fedre_digits.py:pat, :c100k10, "
                     ":c100k20, :c10, :smoke, :mnist1d, :dir05 (comma-separated).")
  if "c10" in opts and ({"c100k10", "c100k20"} & opts):
    raise ValueError("fedre_digits.py: c10 (10 clients) and c100k10 / c100k20 (100 clients) "
                     "exclude each other; pick one.")
  c = get_base_config()
  c.algorithm = "fedre"
  c.archs = ARCHS
  c.rounds = 100
  c.local_epochs = 1
  c.batch_size = 32
  c.client_lr = 0.06
  c.data.dataset = "digits"
  c.data.num_clients = 10
  c.clients_per_round = 10
  c.data.client_test_fraction = 0.25
  c.data.partition = "pat" if "pat" in opts else "pra"
  c.data.alpha = 0.1
  c.data.classes_per_client = 2
  c.data.min_examples = 4
  c.chunk_size = 0
  c.rounds_per_call = 10
  c.eval_every = 10
  c.checkpoint_every = 50
  if "c100k10" in opts or "c100k20" in opts:
    c.data.num_clients = 100
    c.clients_per_round = 10 if "c100k10" in opts else 20
    c.data.classes_per_client = 2
  if "mnist1d" in opts:
    c.data.dataset = "mnist1d"  # 5,000 signals: 4,000 train (split over clients), 1,000 test
    c.archs = ARCHS_MNIST1D
    c.data.num_clients = 100
    c.clients_per_round = 10 if "c100k10" in opts else 20
    c.batch_size = 10  # a client holds about 30 training signals (B = 32 would be one step)
    if "c10" in opts:  # the paper's main setting: 10 clients, all join, B = 32
      c.data.num_clients = c.clients_per_round = 10
      c.batch_size = 32  # a client holds about 300 training signals
    if "pat" not in opts and "pra" not in opts:
      opts.add("dir05")
  if "dir05" in opts:
    c.data.partition = "dirichlet"
    c.data.alpha = 0.5
  if "smoke" in opts:
    c.rounds = 4
    c.rounds_per_call = 2
    c.eval_every = 2
    c.checkpoint_every = 2
    c.archs = ("mlp_s", "cnn1d_s" if "mnist1d" in opts else "cnn_s")
  return c
