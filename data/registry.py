"""The data registries: dataset and partitioner names -> functions, each filled by one decorator.

A new dataset or partitioner is one function with one decorator line; the
data config then names it (``--config.data.dataset=<name>``,
``--config.data.partition=<name>``) and nothing else changes::

  from fedjax_sim.data import register_partitioner

  @register_partitioner("sorted_shards")
  def sorted_shards(labels, num_clients, seed, *, min_examples: int = 2):
    ...  # -> num_clients index arrays into labels, every index exactly once

A function declares what it reads from the data config by its signature:

* a partitioner is ``fn(labels int [N], num_clients, seed, **knobs)``; each
  keyword parameter after the first three is a knob read from
  ``cfg.data.<knob>`` (its default where the config has no such key);
* a dataset is ``fn(**knobs)``; each parameter is read from ``cfg.data.<name>``
  (its default where the config has no such key), except three the pipeline
  supplies: ``seed`` (the run seed), ``batch_size`` (client arrays are padded
  to a multiple of it) and ``partitioner`` (``(labels, num_clients, seed) ->
  parts``: the configured partitioner with its knobs bound). It returns a
  :class:`fedjax_sim.data.Dataset` (a centralized train/test split, which the
  pipeline partitions over the clients) or a
  :class:`fedjax_sim.data.FederatedData` (the dataset defines its clients).

Each function validates its own knobs and raises :class:`PartitionError` or
:class:`DatasetError` with one line naming ``--config.data.<knob>`` and the fix.
Names are matched case-insensitively.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Mapping

__all__ = ["DATASETS", "PARTITIONERS", "DatasetError", "PartitionError", "bind", "get_dataset",
           "defines_clients", "get_partitioner", "knobs_of", "register_dataset", "register_partitioner"]


class DatasetError(ValueError):
  """A dataset is unknown, missing or malformed (message says how to fix it)."""


class PartitionError(ValueError):
  """A partition setting is invalid or cannot be satisfied."""


# name -> fn(**knobs) -> Dataset | FederatedData
DATASETS: dict[str, Callable[..., Any]] = {}
# name -> fn(labels, num_clients, seed, **knobs) -> list of index arrays
PARTITIONERS: dict[str, Callable[..., list]] = {}
_PARTITION_ALIASES: dict[str, str] = {}  # alias -> registered name (FedRE's pra / pat)
DATASET_CONTEXT = ("seed", "batch_size", "partitioner")  # supplied by the pipeline, not cfg.data
_REQUIRED = inspect.Parameter.empty


def _same_definition(a: Callable, b: Callable) -> bool:
  """The same function defined again: its source file ran again (the CLI loads a config file
  twice, under two module names), so the same file, line and qualified name."""
  def where(f):
    code = getattr(f, "__code__", None)
    return (getattr(f, "__qualname__", None), getattr(code, "co_filename", None),
            getattr(code, "co_firstlineno", None))
  return where(a) == where(b) and where(a)[1] is not None


def register_dataset(name: str, *, defines_clients: bool = False):
  """Decorator: registers ``fn(**knobs) -> Dataset | FederatedData`` as dataset ``name``.

  Running the registering source again (the same file, line and function name)
  replaces the entry.

  Args:
    name: the ``cfg.data.dataset`` value (``<prefix>:<path>`` for a family of files).
    defines_clients: the data bring their own clients (natural partitions), so
      ``cfg.data.num_clients`` is not read and the cohort is checked against the
      loaded clients instead (``fn.defines_clients``).

  Raises:
    ValueError: ``name`` is already registered by another function.
  """
  def wrap(fn):
    key = name.lower()
    if key in DATASETS and not _same_definition(DATASETS[key], fn):
      raise ValueError(f"dataset '{name}' is registered twice.")
    fn.defines_clients = defines_clients
    DATASETS[key] = fn
    return fn
  return wrap


def register_partitioner(name: str, *, aliases: Iterable[str] = ()):
  """Decorator: registers ``fn(labels, num_clients, seed, **knobs) -> parts`` as ``name``.

  Running the registering source again (the same file, line and function name)
  replaces the entry.

  Args:
    name: the ``cfg.data.partition`` value.
    aliases: other names accepted for it (e.g. FedRE's ``pra`` for dirichlet).

  Raises:
    ValueError: ``name`` or an alias is already registered by another function.
  """
  def wrap(fn):
    keys = [name.lower(), *(a.lower() for a in aliases)]
    old = PARTITIONERS.get(keys[0])
    if old is not None and _same_definition(old, fn):  # its module ran again: replace
      for a in [a for a, n in _PARTITION_ALIASES.items() if n == keys[0]]:
        del _PARTITION_ALIASES[a]
      del PARTITIONERS[keys[0]]
    taken = [k for k in keys if k in PARTITIONERS or k in _PARTITION_ALIASES]
    if taken:
      raise ValueError(f"partitioner '{taken[0]}' is registered twice.")
    PARTITIONERS[keys[0]] = fn
    _PARTITION_ALIASES.update({a: keys[0] for a in keys[1:]})
    return fn
  return wrap


def _names(table: Mapping, aliases: Mapping | None = None) -> str:
  out = ", ".join(sorted(table))
  if aliases:
    out += " (or " + ", ".join(f"{a} = {n}" for a, n in sorted(aliases.items())) + ")"
  return out


def get_partitioner(name: str) -> tuple[str, Callable]:
  """``(registered name, fn)`` of partition ``name`` (an alias resolves to its target).

  Raises:
    PartitionError: unknown name (the message lists the registered ones).
  """
  key = str(name).lower()
  key = _PARTITION_ALIASES.get(key, key)
  if key not in PARTITIONERS:
    raise PartitionError(f"Unknown partition '{name}'; set --config.data.partition to one of "
                         f"{_names(PARTITIONERS, _PARTITION_ALIASES)}.")
  return key, PARTITIONERS[key]


def get_dataset(name: str) -> Callable:
  """The function of dataset ``name``.

  A name ``<prefix>:<arg>`` that is not registered itself resolves to the
  dataset registered as ``<prefix>:<path>`` with ``<arg>`` (case kept) bound to
  its first parameter (``leaf:data/shakespeare/data`` -> ``load_leaf(path)``).

  Raises:
    DatasetError: unknown name (the message lists the registered ones).
  """
  key = str(name).lower()
  prefix, colon, arg = str(name).partition(":")
  if key not in DATASETS and colon and f"{prefix.lower()}:<path>" in DATASETS:
    return functools.partial(DATASETS[f"{prefix.lower()}:<path>"], arg)
  if key not in DATASETS:
    raise DatasetError(f"Unknown dataset '{name}'; set --config.data.dataset to one of "
                       f"{_names(DATASETS)} (digits is embedded; tfds:* read a prepared "
                       "--config.data.data_dir).")
  return DATASETS[key]


def defines_clients(name: str) -> bool:
  """Whether dataset ``name`` brings its own clients (``register_dataset(defines_clients=True)``).

  Raises:
    DatasetError: unknown name.
  """
  fn = get_dataset(name)
  return bool(getattr(getattr(fn, "func", fn), "defines_clients", False))


def knobs_of(fn: Callable, skip: int = 0) -> dict[str, Any]:
  """``{parameter: default}`` of ``fn``'s parameters after the first ``skip`` positional ones.

  A parameter without a default maps to ``inspect.Parameter.empty`` (required).
  """
  params = [p for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  return {p.name: p.default for p in params[skip:]}


def bind(fn: Callable, available: Mapping[str, Any], *, skip: int = 0,
         what: str = "") -> dict[str, Any]:
  """The keyword arguments ``fn`` declares (after ``skip`` positional ones), from ``available``.

  A declared parameter missing from ``available`` keeps its default.

  Raises:
    DatasetError: a parameter without a default is missing from ``available``.
  """
  out = {}
  for name, default in knobs_of(fn, skip).items():
    if name in available:
      out[name] = available[name]
    elif default is _REQUIRED:
      raise DatasetError(f"{what or fn.__name__} needs --config.data.{name}; set it in the config "
                         "file (a ConfigDict key the command line can then override).")
  return out
