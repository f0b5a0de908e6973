"""The ``fedjax-sim`` command line (thin: flags only; the work is in the library).

  fedjax-sim run [--config=<file>[:arg]] [--config.<key>=<value> ...] [--workdir=<dir>] [--resume]

With no arguments ``fedjax-sim run`` trains FedAvg on the embedded digits data
(100 clients, Dir(0.5), 20 per round) and writes ``runs/<algorithm>_<dataset>_<time>``.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from fedjax_sim.launch import configs
from fedjax_sim.launch import sweep as _sweep  # noqa: F401  (defines the sweep's flags)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", configs.path("fedavg_digits"), "Python config file (get_config), optionally "
    "<file>:<arg> for a variant such as :smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default runs/<algorithm>_<dataset>_<time>).")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize first.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")

COMMANDS = ("run", "sweep")


def format_summary(row: dict, cfg, workdir: str) -> str:
  """A small fixed-width table of the final metrics."""
  keys = [("test_accuracy", "global test accuracy"), ("test_loss", "global test loss"),
          ("client_acc_mean", "client accuracy mean"), ("client_acc_std", "client accuracy std"),
          ("client_acc_worst10", "client accuracy worst 10%"), ("jain_index", "Jain's index"),
          ("d_cosine", "D_Cosine (rad)"), ("d_manhattan", "D_Manhattan (pp)"),
          ("padding_efficiency", "padding efficiency"),
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
    lines.append(f"{label:<30}{row[k]:>14.4f}")
  lines += ["-" * 44, f"run directory: {workdir} (metrics.jsonl, plots.png, checkpoints/)"]
  return "\n".join(lines)


def main(argv):
  cmd = argv[1:] or ["run"]
  if cmd[0] not in COMMANDS or len(cmd) > 1:
    raise app.UsageError(f"unknown command {' '.join(cmd)!r}; usage: fedjax-sim run "
                         "[--config=<file>] [--config.<key>=<value>] [--workdir=<dir>] [--resume]"
                         " | fedjax-sim sweep --help")
  if cmd[0] == "sweep":
    from fedjax_sim.launch import sweep
    sys.exit(sweep.main(FLAGS))
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if FLAGS.distributed:
    from fedjax_sim import distributed
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  cfg = FLAGS.config
  workdir = FLAGS.workdir or os.path.join(
      "runs", f"{cfg.algorithm}_{cfg.data.dataset.replace(':', '-')}_{time.strftime('%Y%m%d-%H%M%S')}")
  from fedjax_sim.errors import FedSimError
  from fedjax_sim.data import DatasetError, PartitionError
  from fedjax_sim.simulation import train_and_evaluate
  try:
    row = train_and_evaluate(cfg, workdir, resume=FLAGS.resume)
  except (FedSimError, DatasetError, PartitionError) as err:
    print(f"fedjax-sim: error: {err}", file=sys.stderr)
    sys.exit(1)
  import jax
  if jax.process_index() == 0:
    print(format_summary(row, cfg, workdir))


def cli():
  app.run(main)


if __name__ == "__main__":
  cli()
