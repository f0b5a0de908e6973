"""CoRe-Fed ablations (arXiv 2602.00647; docs/decisions.md#core-fed): the variant is the arg.

  <dataset>:<variant> with dataset digits | fmnist | cifar10 and variant
    corefed    all mechanisms (alignment + distillation + contribution + reuse)
    refed      Re-Fed: alignment + distillation, FedAvg weights
    cofed      Co-Fed: contribution-aware weights + gradient reuse
    reference  what the official code runs: contribution weights only
    fedavg     the baseline
    qffl       q-FedAvg, q = 1
    fedmdfg    FedMDFG, theta = 11.25 deg, s = 5

  fedjax-sim run --config=launch/configs/corefed_ablation.py:digits:refed --workdir=runs/refed
  fedjax-sim run --config=launch/configs/corefed_ablation.py:cifar10:cofed \\
      --config.data.data_dir=~/tensorflow_datasets

The k, gamma sensitivity grid (k in {0.5, 2.0}, gamma in {0.5, 2.0}) is the
``grid`` variant list below; ``python launch/experiments/corefed_grid.py``
runs it (``--dataset``, ``--rounds``, ``--seeds``).
"""
import ml_collections

from fedjax_sim.launch.configs import corefed_cifar10, corefed_digits, corefed_fmnist

DATASETS = {"digits": corefed_digits, "fmnist": corefed_fmnist, "cifar10": corefed_cifar10}
VARIANTS = ("corefed", "refed", "cofed", "reference", "fedavg", "qffl", "fedmdfg")
# The sensitivity grid: (k, gamma).
GRID = [(k, gamma) for k in (0.5, 2.0) for gamma in (0.5, 2.0)]


def get_config(arg: str = "digits:corefed"):
  dataset, _, variant = (arg or "digits:corefed").partition(":")
  variant = variant or "corefed"
  if dataset not in DATASETS or variant not in VARIANTS:
    raise ValueError(f"corefed_ablation arg '{arg}' must be <{'|'.join(DATASETS)}>:"
                     f"<{'|'.join(VARIANTS)}>.")
  c = DATASETS[dataset].get_config()
  if variant == "reference":
    c.algorithm = "corefed"
    c.corefed = ml_collections.ConfigDict({"reference_code": True})
  else:
    c.algorithm = variant
  return c
