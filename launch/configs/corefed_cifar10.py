"""CoRe-Fed (arXiv 2602.00647) on CIFAR-10 (TFDS), the paper's setup
(``docs/decisions.md#core-fed``):
100 clients, 20 per round, Dir(0.5), batch 50, SGD lr 0.1 decaying 0.999 per
round, E = 1, 1000 rounds, CNN conv(64,5)-pool-conv(64,5)-pool-FC384-FC192
(embedding = the 192-d layer), unequal participation (``availability``).
Paper (Dir 0.5): acc .722, D_Cos .430, D_Man 36.0; q-FedAvg .628/.702/52.9.

Gradient reuse keeps every client's last update in server state: 100 x 1.75M
parameters = 0.7 GB float32 for this CNN.

  fedjax-sim run --config=launch/configs/corefed_cifar10.py --config.data.data_dir=~/tensorflow_datasets

Ablations: ``--config.algorithm=refed|cofed|fedavg|qffl|fedmdfg``; official-code
behaviour: ``--config.corefed.reference_code=True``. ``:smoke``: 4 rounds.
"""
from fedjax_sim.launch.configs import fedavg_cifar10


def get_config(arg: str = ""):
  c = fedavg_cifar10.get_config(arg)  # the paper's data/model/optimizer setup
  c.algorithm = "corefed"
  c.sampler = "availability"
  return c
