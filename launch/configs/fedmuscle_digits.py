"""FedMuscle on multi-task, multi-model digits (arXiv 2602.01626; docs/decisions.md#fedmuscle).

Run (reproduces docs/results/fedmuscle_digits.md)::

  python -m fedjax_sim.launch.experiments.fedmuscle_digits --out=docs/results

``get_config("smoke")`` is a seconds-long variant (2 rounds, 1 seed).
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.archs = ("mlp_s", "mlp_m", "cnn_s")  # pools; user u has archs[u % 3]
  c.tasks = ("digit10", "parity", "gt4", "mod3")  # user u has tasks[u % 4]
  c.num_users = 12  # C: every (arch, task) pair once
  c.examples_per_user = 40  # labeled training examples per user
  c.public_per_class = 30  # public split: 300 digits no user owns
  c.partition = "iid"
  c.alpha = 0.5  # only for partition = dirichlet
  c.rounds = 40
  c.rounds_per_call = 10  # also the evaluation cadence
  c.seeds = (0, 1, 2)
  c.methods = ("local", "muscle", "pairwise", "gram")
  c.M = 3  # other users per anchor (paper's recommended M)
  c.tau_n = 0.2  # tau^(N)
  c.tau_n1 = 0.15  # tau^(N-1)
  c.public_batch = 32  # B
  c.proj_dim = 32  # d
  c.align_steps = 5  # T
  c.align_lr = 0.05
  c.client_lr = 0.05
  c.client_momentum = 0.9
  c.batch_size = 10
  c.local_epochs = 1  # E
  if arg == "smoke":
    c.rounds = c.rounds_per_call = 2
    c.seeds = (0,)
  return c
