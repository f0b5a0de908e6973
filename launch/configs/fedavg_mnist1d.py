"""FedAvg on MNIST-1D (arXiv 2011.14439): 100 clients, Dir(0.5), 20 per round, the paper's CNN.

  fedjax-sim run --config=launch/configs/fedavg_mnist1d.py --workdir=runs/fedavg_mnist1d
  fedjax-sim run --config=launch/configs/fedavg_mnist1d.py:gru --config.data.num_samples=100000

``data.num_samples`` (default 5,000 as in the paper: 4,000 train, 1,000 the
global test set) and ``data.mnist1d_seed`` (the generator's seed, 42 as in the
paper) are the dataset's knobs (``fedjax_sim/data/mnist1d.py``).

The argument after ``:`` is a comma-separated list of options:

* a model: ``cnn1d`` (default; the paper's CNN, 5,210 parameters), ``gru``
  (the paper's bidirectional GRU(6)), ``mlp`` (two ReLU layers of 100; the
  paper's MLP also adds a skip connection around its second layer) or
  ``logreg`` (logistic regression: an MLP without hidden layers);
* ``centralized``: the paper's centralized training through the same
  pipeline: ONE client holding all 4,000 training examples
  (``client_test_fraction`` 0), full participation, and the paper's
  optimizer, Adam with learning rate 1e-2 (b1 0.9, b2 0.999, eps 1e-8) on
  minibatches of 100 for 6,000 steps: each round is one local SGD step with
  client lr 1, so the pseudo-gradient the server's Adam receives is the
  minibatch gradient (FedAdam with one client and one step is centralized Adam);
* ``smoke``: a few rounds (seconds).
"""
import ml_collections

from fedjax_sim.launch.configs.base import get_base_config

MODEL_PRESETS = {
    "cnn1d": ("cnn1d", {"features": (25, 25, 25), "kernel_sizes": (5, 3, 3)}),
    "gru": ("gru", {"hidden_size": 6}),
    "mlp": ("mlp", {"hidden": (100, 100)}),
    "logreg": ("mlp", {"hidden": ()}),
}


def get_config(arg: str = ""):
  options = [a for a in arg.split(",") if a]
  unknown = sorted(set(options) - set(MODEL_PRESETS) - {"centralized", "smoke"})
  if unknown:
    raise ValueError(f"fedavg_mnist1d: unknown option(s) {', '.join(unknown)}; use a model "
                     f"({', '.join(MODEL_PRESETS)}), centralized and/or smoke (comma-separated)")
  c = get_base_config()
  c.algorithm = "fedavg"
  c.data.dataset = "mnist1d"
  c.data.num_samples = 5000
  c.data.mnist1d_seed = 42
  c.data.num_clients = 100
  c.data.partition = "dirichlet"
  c.data.alpha = 0.5
  c.clients_per_round = 20
  model = next((o for o in options if o in MODEL_PRESETS), "cnn1d")
  c.model = MODEL_PRESETS[model][0]
  c.model_kwargs = ml_collections.ConfigDict(MODEL_PRESETS[model][1])
  c.batch_size = 10
  c.client_lr = 0.1
  c.local_epochs = 1
  c.rounds = 500
  c.eval_every = 10
  if "centralized" in options:
    c.data.num_clients = 1
    c.data.partition = "iid"
    c.data.client_test_fraction = 0.0
    c.clients_per_round = 1
    c.batch_size = 100
    c.local_steps = 1
    c.client_lr = 1.0
    c.server_optimizer = "adam"
    c.server_lr = 1e-2
    c.server_b1, c.server_b2, c.server_tau = 0.9, 0.999, 1e-8
    c.rounds = 6000
    c.eval_every = 250
    c.rounds_per_call = 250
    c.checkpoint_every = 6000
  if "smoke" in options:
    c.rounds, c.eval_every, c.rounds_per_call, c.checkpoint_every = 10, 5, 5, 5
  return c
