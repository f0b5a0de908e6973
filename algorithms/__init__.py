"""Federated algorithms, one module per method, each registering itself.

Importing this package imports every module in it, so each module's
``@register(...)`` line (:mod:`fedjax_sim.algorithms.registry`) fills
:data:`ALGORITHMS`; adding an algorithm is one new module plus its test.
:func:`fedjax_sim.algorithms.registry.build` turns a name, a
:class:`~fedjax_sim.algorithms.registry.BuildContext` and the method's knob
sub-dict (``cfg.<algorithm>``) into a
:class:`~fedjax_sim.protocol.FederatedAlgorithm`.
"""
from __future__ import annotations

import importlib
import pkgutil

from fedjax_sim.algorithms.registry import (ALGORITHMS, BuildContext, DataSpec, build,
                                            knob_defaults, register)
from fedjax_sim.algorithms.fedavg import fedavg, server_optimizer
from fedjax_sim.algorithms.fedprox import fedprox
from fedjax_sim.algorithms.local import local_only
from fedjax_sim.algorithms.scaffold import scaffold

__all__ = ["ALGORITHMS", "BuildContext", "DataSpec", "build", "fedavg", "fedprox",
           "knob_defaults", "local_only", "register", "scaffold", "server_optimizer"]

for _module in pkgutil.iter_modules(__path__):  # each algorithm module registers itself
  importlib.import_module(f"{__name__}.{_module.name}")
