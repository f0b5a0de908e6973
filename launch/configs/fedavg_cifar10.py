"""FedAvg on CIFAR-10 (TFDS) as in CoRe-Fed (arXiv 2602.00647): 100 clients, 20 per
round, Dir(0.5), batch 50, SGD lr 0.1 decaying 0.999 per round, E = 1, CNN
conv(64,5)-pool-conv(64,5)-pool-FC384-FC192.

  fedjax-sim run --config=launch/configs/fedavg_cifar10.py --config.data.data_dir=~/tensorflow_datasets
"""
from fedjax_sim.launch.configs.base import get_base_config
import ml_collections


def get_config(arg: str = ""):
  c = get_base_config()
  c.data.dataset = "tfds:cifar10"
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
