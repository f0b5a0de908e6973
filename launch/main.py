"""The ``fedjax-sim`` command line (thin: flags only; the work is in the library).

  fedjax-sim run [--config=<file>[:arg]] [--config.<key>=<value> ...] [--workdir=<dir>] [--resume]
  fedjax-sim sweep --help

With no arguments ``fedjax-sim run`` trains FedAvg on the embedded digits data
(100 clients, Dir(0.5), 20 per round) and writes ``runs/<algorithm>_<dataset>_<time>``.

Bad input never ends in a traceback: a config file that cannot be loaded, an
unknown ``--config.<key>`` (the closest valid key is named), a value of the
wrong type, a bad setting (:func:`fedjax_sim.launch.experiment.validate_config`) or a
``--workdir`` that cannot be created exits non-zero with one line
``fedjax-sim: error: <what and how to fix it>`` on stderr (exit status 2 for
command-line errors found before anything runs, 1 for errors during the run).
"""
from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import os
import re
import sys
import time
import traceback
from typing import Optional, Sequence

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from fedjax_sim.errors import UsageError
from fedjax_sim.launch import configs
from fedjax_sim.launch import sweep as _sweep  # defines the sweep's flags; its help

FLAGS = flags.FLAGS
DEFAULT_CONFIG = configs.path("fedavg_digits")
# --config is defined by cli() once the command line is checked: ml_collections parses the
# default config file, with the command line's overrides, when the flag is defined, so a bad
# --config.<key> defined at import time would end in a traceback before any check could run.
flags.DEFINE_string("workdir", None, "Run directory (default runs/<algorithm>_<dataset>_<time>).")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize first.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")

COMMANDS = ("run", "sweep")
_CONFIG_ARG = re.compile(r"^--?config(=|$)")  # --config=<file> or --config <file>
_OVERRIDE_ARG = re.compile(r"^--?(no)?config\.([^=]+)(=(.*))?$", re.S)  # --config.<key>[=<value>]


def _shipped_configs() -> str:
  return ", ".join(sorted(f[:-3] for f in os.listdir(configs.CONFIG_DIR)
                          if f.endswith(".py") and f not in ("__init__.py", "base.py")))


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def load_config_file(spec: str) -> ConfigDict:
  """``<file>[:<arg>]`` -> the file's ``get_config(<arg>)``, as ``--config`` loads it.

  Like ml_collections, the path is the part before the first ``:``, relative to
  the working directory, and any file is executed as Python source.

  Raises:
    UsageError: one line: the file is missing, is not Python, has no
      ``get_config``, or its ``get_config`` fails or returns no ConfigDict.
  """
  path, colon, arg = spec.partition(":")
  fix = ("pass a Python file whose get_config() returns a ConfigDict, e.g. "
         f"--config=launch/configs/fedavg_digits.py (shipped: {_shipped_configs()})")
  if not path:
    raise UsageError(f"--config={spec!r} names no file; {fix}.")
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise UsageError(f"--config={spec}: {path} {what}; {fix}.")
  try:
    loader = importlib.machinery.SourceFileLoader("fedjax_sim_cli_config", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
  except SyntaxError as err:
    raise UsageError(f"--config={spec}: {path} is not a Python config (SyntaxError: {err.msg}, line "
                     f"{err.lineno}); {fix}.") from None
  except Exception as err:  # anything the file's own code raises
    raise UsageError(f"--config={spec}: {path} is not a Python config ({_where(err, path)}); "
                     f"{fix}.") from None
  if not callable(getattr(module, "get_config", None)):
    raise UsageError(f"--config={spec}: {path} has no get_config() function; {fix}.")
  call = f"get_config({arg!r})" if colon else "get_config()"
  try:
    cfg = module.get_config(arg) if colon else module.get_config()
  except Exception as err:
    raise UsageError(f"--config={spec}: {path}'s {call} failed ({_where(err, path)}); fix the "
                     "file or choose another <file>:<arg> variant.") from None
  if not isinstance(cfg, ConfigDict):
    raise UsageError(f"--config={spec}: {path}'s {call} returned {type(cfg).__name__}, not "
                     "an ml_collections ConfigDict; return one (see launch/configs/base.py).")
  return cfg


def _where(err: BaseException, path: str) -> str:
  """``NameError: name 'x' is not defined, line 3`` (the line in ``path`` when known)."""
  line = [f.lineno for f in traceback.extract_tb(err.__traceback__)
          if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f"{type(err).__name__}: {_one_line(err)}" + (f", line {line[-1]}" if line else "")


def config_keys(cfg: ConfigDict, prefix: str = "") -> dict[str, object]:
  """Every settable key of ``cfg``, dotted (``data.alpha``), with its value; groups excluded."""
  out: dict[str, object] = {}
  for k, v in cfg.items():
    if isinstance(v, ConfigDict):
      out.update(config_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def closest_key(key: str, keys: Sequence[str]) -> str:
  """The valid key closest to ``key``: the same last part in another group (``alpha`` ->
  ``data.alpha``), else the nearest by ``difflib.get_close_matches``."""
  leaf = key.rsplit(".", 1)[-1]
  same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
  if same_leaf:
    return same_leaf[0]
  return (difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
          or difflib.get_close_matches(leaf, keys, n=1, cutoff=0.0)
          or difflib.get_close_matches(key, keys, n=1, cutoff=0.0))[0]


def _kind(value) -> str:
  if isinstance(value, bool):
    return "true or false"
  if isinstance(value, int):
    return "an integer"
  if isinstance(value, float):
    return "a number"
  if isinstance(value, tuple):
    return "a tuple such as (32,)"
  return "a value"


def config_from_argv(argv: Sequence[str]) -> ConfigDict:
  """The config a ``fedjax-sim`` command line describes, or a one-line error.

  Loads ``--config`` (default ``launch/configs/fedavg_digits.py``) and applies every
  ``--config.<key>=<value>`` (also ``--config.<key> <value>`` and ``--noconfig.<flag>``)
  with ml_collections' own flag parsers, exactly as the CLI's ``--config`` flag
  does; values are not range-checked here (that is
  :func:`fedjax_sim.launch.experiment.validate_config`).

  Args:
    argv: the whole command line, ``argv[0]`` the program.

  Raises:
    UsageError: one line naming the flag and the fix: a file that is not a
      Python config, an unknown key (with the closest valid key), a group of
      keys set as a whole, an override before ``--config``, or a value of the
      wrong type.
  """
  argv = list(argv)
  spec, config_at = DEFAULT_CONFIG, -1
  for i, a in enumerate(argv[1:], 1):
    m = _CONFIG_ARG.match(a)
    if m:
      spec, config_at = (a.split("=", 1)[1] if m.group(1) == "=" else
                         (argv[i + 1] if i + 1 < len(argv) else "")), i
  cfg = load_config_file(spec)
  # The method's knob sub-dict (cfg.<algorithm>) is completed from its constructor's defaults
  # first, for the algorithm the command line selects, so --config.<algorithm>.<knob> exists.
  from fedjax_sim.launch.experiment import complete_config
  for a in argv[1:]:
    m = _OVERRIDE_ARG.match(a)
    if m and m.group(2) == "algorithm" and m.group(4) is not None:
      with cfg.unlocked():
        cfg.algorithm = m.group(4)
  complete_config(cfg)
  keys = config_keys(cfg)
  overrides: list[str] = []  # the override arguments, values included
  skip = False
  for i, a in enumerate(argv[1:], 1):
    if skip:
      skip = False
      continue
    m = _OVERRIDE_ARG.match(a)
    if not m:
      continue
    key, has_value = m.group(2), m.group(3) is not None
    if key not in keys:
      node = cfg
      try:
        for part in key.split("."):
          node = node[part]
      except (KeyError, TypeError, AttributeError):
        node = None
      if isinstance(node, ConfigDict):
        example = next(k for k in keys if k.startswith(key + "."))
        raise UsageError(f"{a}: config.{key} is a group of settings; set its keys one at a "
                         f"time, e.g. --config.{example}={keys[example]!r}.")
      from fedjax_sim.algorithms import ALGORITHMS
      method = key.split(".", 1)[0]
      if "." in key and method in ALGORITHMS and method != cfg.algorithm:
        raise UsageError(f"{a}: {key} is a knob of algorithm '{method}', but the config runs "
                         f"'{cfg.algorithm}'; add --config.algorithm={method}.")
      near = closest_key(key, list(keys))
      raise UsageError(f"unknown config key '{key}' in {a}; the closest valid key is "
                       f"--config.{near} (now {keys[near]!r}); the keys are those of "
                       f"{_rel(spec.partition(':')[0])}.")
    if 0 < config_at and i < config_at:
      raise UsageError(f"{a} comes before --config={spec}; put --config first, then the "
                       "--config.<key> overrides.")
    overrides.append(a)
    if not has_value and not m.group(1) and not isinstance(keys[key], bool) and i + 1 < len(argv):
      overrides.append(argv[i + 1])  # --config.<key> <value>
      skip = True
  sub = [argv[0] if argv else "fedjax-sim"] + overrides
  parsed = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", cfg, flag_values=parsed, lock_config=True,
                                    sys_argv=sub)
    parsed(sub)
  except Exception as err:  # absl's IllegalFlagValueError and whatever a parser raises
    msg = _one_line(err)
    m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)$", msg)
    if m and m.group(1) in keys:
      key, value, why = m.groups()
      raise UsageError(f"--config.{key}={value}: expected {_kind(keys[key])} ({why}); e.g. "
                       f"--config.{key}={keys[key]!r}.") from None
    raise UsageError(f"bad --config override ({msg}); write --config.<key>=<value>.") from None
  return parsed.config


def _cell(key: str, value) -> str:
  """A summary value, 14 wide: counts (``comm/*``, integer-valued) as ``1,104,200``, other
  numbers (accuracies, losses, times) with four decimals."""
  if key.startswith("comm/") and float(value).is_integer():
    return f"{int(value):>14,}"
  if key == "dp_delta":  # small: three significant digits
    return f"{value:>14.3g}"
  return f"{value:>14.4f}"


def format_summary(row: dict, cfg, workdir: str) -> str:
  """A small fixed-width table of the final metrics.

  Counts (the integer-valued ``comm/*`` scalars) print as integers with
  thousands separators, everything else with four decimals.
  """
  keys = [("test_accuracy", "global test accuracy"), ("test_loss", "global test loss"),
          ("client_acc_mean", "client accuracy mean"), ("client_acc_std", "client accuracy std"),
          ("client_acc_worst10", "client accuracy worst 10%"), ("jain_index", "Jain's index"),
          ("d_cosine", "D_Cosine (rad)"), ("d_manhattan", "D_Manhattan (pp)"),
          ("delta_pct", "Delta (%) vs local training"),
          ("padding_efficiency", "padding efficiency"),
          ("dp_epsilon", "DP epsilon (at dp_delta)"), ("dp_delta", "DP delta"),
          ("comm/upload_scalars_per_round", "uploaded scalars / round"),
          ("comm/broadcast_scalars_per_round", "broadcast scalars / round"),
          ("train_time_s", "training time (s)")]
  lines = [f"{cfg.algorithm} on {cfg.data.dataset}: {cfg.data.num_clients} clients, "
           f"{cfg.data.partition} (alpha={cfg.data.alpha}), {cfg.clients_per_round} per round, "
           f"{row.get('round', 0)} rounds", "-" * 44]
  shown = [(k, label) for k, label in keys if k in row]
  if "test_accuracy" not in row:  # an algorithm with its own evaluation: show its metrics
    shown = [(k, k) for k, v in row.items() if isinstance(v, float) and k != "wall_s"]
  for k, label in shown:
    lines.append(f"{label:<30}{_cell(k, row[k])}")
  lines += ["-" * 44, f"run directory: {workdir} (metrics.jsonl, plots.png, checkpoints/)"]
  return "\n".join(lines)


def _fail(message, status: int) -> None:
  """Prints ``fedjax-sim: error: <message>`` (one line) on stderr and exits with ``status``."""
  print(f"fedjax-sim: error: {_one_line(message)}", file=sys.stderr)
  sys.exit(status)


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` (and its parents) or says in one line why it cannot be.

  Raises:
    UsageError: a parent is a regular file, the file system refuses (``/proc``,
      read-only, no permission), or ``workdir`` is a file.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as err:
    parent = os.path.abspath(workdir)  # the deepest part of the path that exists
    while parent != os.path.dirname(parent) and not os.path.exists(parent):
      parent = os.path.dirname(parent)
    why = (f"{parent} is a file, not a directory" if os.path.isfile(parent) else
           f"{parent} refuses it: {_one_line(err.strerror or err)}")
    raise UsageError(f"--workdir={workdir} cannot be created ({why}); choose a directory you "
                     "can write, e.g. --workdir=runs/my_run.") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UsageError(f"--workdir={workdir} is not writable; choose a directory you can write, "
                     "e.g. --workdir=runs/my_run.")


def main(argv):
  """The command after absl parsed the flags: ``run`` (default) or ``sweep``."""
  cmd = argv[1:] or ["run"]
  if cmd[0] not in COMMANDS or len(cmd) > 1:
    _fail(f"unknown command {' '.join(cmd)!r}; the commands are run and sweep (fedjax-sim "
          "--help lists them).", 2)
  if cmd[0] == "sweep":
    from fedjax_sim.launch import sweep
    sys.exit(sweep.main(FLAGS))
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if FLAGS.distributed:
    from fedjax_sim import distributed
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  cfg = FLAGS.config
  workdir = FLAGS.workdir or os.path.join(
      "runs", f"{cfg.algorithm}_{cfg.data.dataset.replace(':', '-').replace('/', '_')}_"
      f"{time.strftime('%Y%m%d-%H%M%S')}")
  from fedjax_sim.errors import FedSimError
  from fedjax_sim.data import DatasetError, PartitionError
  from fedjax_sim.launch.experiment import build_experiment, train_and_evaluate
  try:
    exp = build_experiment(cfg)  # checks the config before the run directory is made
    check_workdir(workdir)
    row = train_and_evaluate(cfg, workdir, resume=FLAGS.resume, experiment=exp)
  except (FedSimError, DatasetError, PartitionError) as err:
    _fail(err, 1)
  import jax
  if jax.process_index() == 0:
    print(format_summary(row, cfg, workdir))


def _rel(path: str) -> str:
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def usage(command: Optional[str] = None) -> str:
  """``fedjax-sim --help`` (and ``run --help``); with ``command="sweep"``, the sweep's help."""
  config = f"""\
  --config=<file>[:<arg>]   Python config file whose get_config(<arg>) returns a ConfigDict
                            (default {_rel(DEFAULT_CONFIG)}; :smoke = its quick variant)
  --config.<key>=<value>    override one config value, e.g. --config.rounds=50,
                            --config.data.alpha=0.1 (keys: launch/configs/base.py)
"""
  if command == "sweep":
    doc = (_sweep.__doc__ or "").strip()
    return (f"usage: fedjax-sim sweep [--config=<file>] [--grid=KEY=V1,V2 ...] [--seeds=0,1] "
            f"[--sweep_file=<file>] [--workdir=<dir>] [flags]\n\n{doc}\n\ncommon flags:\n"
            f"{config}  --workdir=<dir>           the sweep's directory (default "
            f"runs/sweep_<time>)\n\nsweep flags:{FLAGS.module_help(_sweep).split(':', 1)[1]}\n")
  common = f"""\
common flags:
{config}  --workdir=<dir>           run directory (default runs/<algorithm>_<dataset>_<time>)
  --resume                  continue from the latest checkpoint in --workdir
  --distributed             multi-host: jax.distributed.initialize first (with
                            --coordinator_address, --num_processes, --process_id)
"""
  return f"""\
usage: fedjax-sim <command> [flags]

Federated-learning simulator in JAX/Flax: a whole round (cohort sampling,
vmapped local training, aggregation) is one jitted program.

commands:
  run     train one config and write its run directory (config.json, metrics.jsonl,
          plots.png, checkpoints/) and a summary table; the default command
  sweep   run a grid of config values and seeds, one run directory per point, and
          summarize them (summary.csv, summary.md, plots); fedjax-sim sweep --help

{common}
examples:
  fedjax-sim run
  fedjax-sim run --config=launch/configs/fedavg_digits.py:smoke --config.data.alpha=0.1 --workdir=runs/smoke
  fedjax-sim sweep --config=launch/configs/fedavg_digits.py:smoke --grid=client_lr=0.05,0.1 --seeds=0,1 --workdir=runs/lr_sweep

Errors print one line (fedjax-sim: error: ...); --helpfull lists every absl flag.
"""


_HELP_ARGS = ("-h", "-help", "--help", "-?", "--helpshort")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, its errors as one line (exit status 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as err:
    _fail(f"{err}; fedjax-sim --help lists the flags.", 2)


def cli(argv: Optional[Sequence[str]] = None) -> None:
  """The ``fedjax-sim`` entry point: help, then the command line's config, then ``main``."""
  argv = list(sys.argv if argv is None else argv)
  words = [a for a in argv[1:] if not a.startswith("-")]
  if any(a in _HELP_ARGS + ("--helpfull",) for a in argv[1:]) or words[:1] == ["help"]:
    text = usage("sweep" if "sweep" in words else None)
    if "--helpfull" in argv[1:]:
      text += f"\nevery flag (absl):\n{FLAGS.get_help()}\n"
    print(text, end="")
    sys.exit(0)
  try:
    cfg = config_from_argv(argv)  # the file, the method's knobs completed, the overrides
  except UsageError as err:
    _fail(err, 2)
  # The parsed config becomes the --config flag (its --config.<key> overrides re-apply the
  # same values), so the method's knob sub-dict that config_from_argv completed is kept.
  rest, skip = [], False
  for i, a in enumerate(argv):
    if skip:
      skip = False
      continue
    m = _CONFIG_ARG.match(a) if i else None
    if m:
      skip = m.group(1) != "="  # --config <file>: drop the file too
      continue
    rest.append(a)
  try:
    config_flags.DEFINE_config_dict("config", cfg, "The run config (--config=<file>[:<arg>] "
                                    "and its --config.<key> overrides).", lock_config=True,
                                    sys_argv=rest)
  except Exception as err:  # checked above; kept to one line should ml_collections disagree
    _fail(f"--config: {err}", 2)
  app.run(main, argv=rest, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
