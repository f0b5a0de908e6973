"""CoRe-Fed (arXiv 2602.00647) on CIFAR-10 (TFDS), the paper's setup (SPEC.md):
100 clients, 20 per round, Dir(0.5), batch 50, SGD lr 0.1 decaying 0.999 per
round, E = 1, 1000 rounds, CNN conv(64,5)-pool-conv(64,5)-pool-FC384-FC192
(embedding = the 192-d layer), unequal participation (``availability``).
Paper (Dir 0.5): acc .722, D_Cos .430, D_Man 36.0; q-FedAvg .628/.702/52.9.

Gradient reuse keeps every client's last update in server state: 100 x 1.75M
parameters = 0.7 GB float32 for this CNN.

  fedjax-sim run --config=launch/configs/corefed_cifar10.py --config.data.data_dir=~/tensorflow_datasets

Ablations: ``--config.algorithm=refed|cofed|fedavg|qffl``; official-code
behaviour: ``--config.corefed.reference_code=True``. ``:smoke``: 4 rounds.
"""
from fedjax_sim.launch.configs.base import get_base_config
import ml_collections


def get_config(arg: str = ""):
  c = get_base_config()
  c.algorithm = "corefed"
  c.data.dataset = "tfds:cifar10"
  c.sampler = "availability"
  c.model = "cnn"
  c.model_kwargs = ml_collections.ConfigDict({"features": (64, 64), "dense": (384, 192)})
  c.batch_size = 50
  c.client_lr = 0.1
  c.lr_decay = 0.999
  c.rounds = 1000
  c.eval_every = 20
  if arg == "smoke":
    c.rounds, c.eval_every, c.rounds_per_call = 4, 2, 2
  return c
