"""CoRe-Fed (arXiv 2602.00647) on Fashion-MNIST (TFDS), the paper's setup
(``docs/decisions.md#core-fed``): 100 clients, 20 per round, Dir(0.5), batch 50, SGD lr 0.1 decaying
0.999 per round, E = 1, 1000 rounds, MLP (200-200; embedding = last hidden
layer), unequal participation via the ``availability`` sampler. Paper (Dir
0.5): acc .891, D_Cos .294, D_Man 73.5; q-FedAvg .884/.401/76.2.

Needs the prepared TFDS dataset (see README, "TFDS datasets"):

  fedjax-sim run --config=launch/configs/corefed_fmnist.py --config.data.data_dir=~/tensorflow_datasets

Ablations: ``--config.algorithm=refed|cofed|fedavg|qffl|fedmdfg``; official-code
behaviour: ``--config.corefed.reference_code=True``. ``:smoke``: 4 rounds.
"""
from fedjax_sim.launch.configs import fedavg_fmnist


def get_config(arg: str = ""):
  c = fedavg_fmnist.get_config(arg)  # the paper's data/model/optimizer setup
  c.algorithm = "corefed"
  c.sampler = "availability"
  return c
