"""FedMuscle on multi-task, multi-model digits (arXiv 2602.01626; docs/decisions.md#fedmuscle).

12 users, architecture ``archs[u % 3]``, task ``tasks[u % 4]`` (dataset
``digits_multitask``: 40 labeled digits each, IID, a 300-digit public split no
user owns), all users every round, 40 rounds. ``c.fedmuscle`` holds the knobs
that differ from ``fedmuscle(...)``'s defaults (none: M = 3, tau^(N) = 0.2,
tau^(N-1) = 0.15, B = 32 public examples, d = 32, T = 5 alignment steps at lr
0.05, method ``muscle``; ``fedjax_sim.launch.experiment.complete_config`` fills
them in). One run trains the local-training baseline alongside and logs
Delta(%) as ``delta_pct`` in every evaluation row::

  fedjax-sim run --config=launch/configs/fedmuscle_digits.py --workdir=runs/fedmuscle_digits
  fedjax-sim run --config=launch/configs/fedmuscle_digits.py --config.fedmuscle.method=gram

Report (every method and seed; reproduces docs/results/fedmuscle_digits.md)::

  python -m fedjax_sim.launch.experiments.fedmuscle_digits --out=docs/results

``seeds`` and ``methods`` are the report driver's. ``get_config("smoke")`` is a
seconds-long variant (2 rounds, 1 seed). ``get_config("mnist1d")`` (combinable with
``smoke``: ``mnist1d,smoke``) is the MNIST-1D setting of ``docs/results/fedmuscle_mnist1d.md``
(dataset ``mnist1d_multitask``, arXiv 2011.14439): 100 users, Dir(0.5) partition of the
non-public signals (each user keeps at most 40), architectures :data:`ARCHS_MNIST1D`::

  python -m fedjax_sim.launch.experiments.fedmuscle_digits --dataset=mnist1d --out=docs/results

``dir01`` (combinable) partitions the users' data by Dir(0.1), the paper's non-IID setting.
"""
import ml_collections

from fedjax_sim.launch.configs.base import get_base_config

ARCHS_MNIST1D = ("mlp_s", "cnn1d_s", "gru_s")  # MODEL_ZOO models for 1-D signals


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = get_base_config()
  c.algorithm = "fedmuscle"
  c.fedmuscle = ml_collections.ConfigDict()  # every knob at fedmuscle(...)'s default
  c.archs = ("mlp_s", "mlp_m", "cnn_s")  # pools; user u has archs[u % 3]
  c.data.dataset = "digits_multitask"
  c.data.num_clients = 12  # C: every (arch, task) pair once
  c.data.tasks = ("digit10", "parity", "gt4", "mod3")  # user u has tasks[u % 4]
  c.data.examples_per_user = 40  # labeled training examples per user
  c.data.public_per_class = 30  # public split: 300 digits no user owns
  c.data.public_seed = 0
  c.data.partition = "iid"
  c.clients_per_round = 12  # all users join every round (each pool's K is its size)
  c.rounds = 40
  c.rounds_per_call = 10  # also the evaluation cadence of the report's driver
  c.eval_every = 10
  c.client_lr = 0.05
  c.client_momentum = 0.9
  c.batch_size = 10
  c.local_epochs = 1  # E
  c.seeds = (0, 1, 2)  # the report's seeds (driver only)
  c.methods = ("local", "muscle", "pairwise", "gram")  # the report's methods (driver only)
  opts = {a for a in arg.split(",") if a}
  if opts - {"smoke", "mnist1d", "dir01"}:
    raise ValueError(f"unknown variant ':{arg}'; use smoke, mnist1d, dir01 (comma-separated) or "
                     "nothing.")
  if "mnist1d" in opts:
    c.archs = ARCHS_MNIST1D
    c.data.dataset = "mnist1d_multitask"
    c.data.num_clients = c.clients_per_round = 100
    c.data.partition = "dirichlet"
    c.data.alpha = 0.5
  if "dir01" in opts:
    c.data.partition = "dirichlet"
    c.data.alpha = 0.1
  if "smoke" in opts:
    c.rounds = c.rounds_per_call = c.eval_every = 2
    c.seeds = (0,)
  return c
