"""CoRe-Fed (arXiv 2602.00647) on the embedded digits data: the runnable default.

100 clients, Dir(0.5), 20 per round, unequal participation (``availability``
sampler, power law a_c = r_c^-0.75: the most available tenth of the clients
joins about 6.8x as often as the least available tenth), MLP 64-200-200-10
(embedding = the 200-d penultimate layer), E = 1, B = 10, SGD lr 0.1 decaying
0.999 per round, 300 rounds. Knobs (``--config.corefed.*``; defaults in the
signature of ``fedjax_sim.algorithms.corefed.corefed``) as in
``docs/decisions.md#core-fed``:
tau_c 0.07, beta 0.5, gamma 0.5, k 2.0, window tau = C/K = 5.

  fedjax-sim run --config=launch/configs/corefed_digits.py --workdir=runs/corefed_digits
  fedjax-sim run --config=launch/configs/corefed_digits.py --config.algorithm=refed  # Re-Fed
  fedjax-sim run --config=launch/configs/corefed_digits.py --config.algorithm=cofed  # Co-Fed
  fedjax-sim run --config=launch/configs/corefed_digits.py --config.corefed.reference_code=True
  fedjax-sim run --config=launch/configs/corefed_digits.py --config.algorithm=qffl --config.qffl.q=1.0
  fedjax-sim run --config=launch/configs/corefed_digits.py --config.algorithm=fedmdfg  # FedMDFG

Variants: ``:smoke`` (10 rounds, seconds). The report's comparison (5 methods
x 3 seeds): ``python launch/experiments/corefed_digits.py``.
"""
from fedjax_sim.launch.configs.base import get_base_config


def get_config(arg: str = ""):
  c = get_base_config()
  c.algorithm = "corefed"
  c.sampler = "availability"
  c.availability.distribution = "power_law"
  c.availability.power = 0.75
  c.rounds = 300
  c.batch_size = 10
  c.client_lr = 0.1
  c.lr_decay = 0.999
  c.local_epochs = 1
  c.eval_every = 10
  if arg == "smoke":
    c.rounds, c.eval_every, c.checkpoint_every, c.rounds_per_call = 10, 5, 5, 5
  return c
