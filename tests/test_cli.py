"""The command line: bad input ends in ONE line on stderr, never a traceback; help; summary.

The CLI runs in subprocesses (``python -m fedjax_sim.launch.main``), started together by a
module fixture so their imports overlap. The property test applies random ``--config.<key>``
overrides with :func:`fedjax_sim.launch.main.config_from_argv` (the parse the CLI runs
before anything else) and then builds the experiment and runs one round in-process.
"""
import atexit
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest
from absl import flags
from hypothesis import HealthCheck, event, given, settings, strategies as st

from ml_collections import config_flags

from fedjax_sim.data import DatasetError, PartitionError
from fedjax_sim.errors import FedSimError, UsageError
from fedjax_sim.launch import main as cli_main
from fedjax_sim.round import init_state, make_round
from fedjax_sim.launch.experiment import build_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "launch", "configs", "fedavg_digits.py") + ":smoke"
TINY = ["--config.data.num_clients=10", "--config.clients_per_round=2",
        "--config.model_kwargs.hidden=(16,)", "--config.rounds=1", "--config.eval_every=1",
        "--config.rounds_per_call=1", "--config.chunk_size=0", "--config.progress=False"]

_TMP = tempfile.mkdtemp(prefix="fedjax_cli_")
atexit.register(shutil.rmtree, _TMP, True)
_FILES = {"text": ("notes.txt", "these are notes, not Python\n"),
          "no_get_config": ("no_get_config.py", "ROUNDS = 3\n"),
          "regular_file": ("a_file", "")}
for _name, _text in _FILES.values():
  with open(os.path.join(_TMP, _name), "w") as _f:
    _f.write(_text)
_path = lambda key: os.path.join(_TMP, _FILES[key][0])

# name -> (extra arguments, expected exit status, words the one error line must hold)
ERRORS = {
    "seed": (["--config.seed=-1"], 1, ["seed=-1", "--config.seed"]),
    "unknown_key": (["--config.nosuchkey=1"], 2, ["nosuchkey", "closest valid key is --config."]),
    "misspelt_key": (["--config.rond=3"], 2, ["rond", "--config.rounds"]),
    "config_text_file": ([f"--config={_path('text')}"], 2, ["not a Python config", "get_config"]),
    "config_no_get_config": ([f"--config={_path('no_get_config')}"], 2, ["no get_config()"]),
    "config_missing": ([f"--config={_TMP}/missing.py"], 2, ["does not exist", "get_config"]),
    "workdir_under_file": ([f"--workdir={_path('regular_file')}/run"], 1,
                           ["--workdir=", "is a file", "choose a directory"]),
    "workdir_proc": (["--workdir=/proc/fedjax_sim_cli_test"], 1,
                     ["--workdir=/proc/fedjax_sim_cli_test", "cannot be created"]),
    "num_devices": (["--config.num_devices=99"], 1, ["num_devices=99", "--config.num_devices"]),
    "classes_per_client": (["--config.data.partition=pathological",
                            "--config.data.classes_per_client=11"], 1,
                           ["classes_per_client=11", "10 classes",
                            "--config.data.classes_per_client"]),
}
HELP = {"help": ["--help"], "run_help": ["run", "--help"], "sweep_help": ["sweep", "--help"]}


def _cli(args):
  cmd = [sys.executable, "-m", "fedjax_sim.launch.main", *args]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def runs():
  """name -> the future of its CompletedProcess. Alone, every case starts at once (4 at a
  time); under pytest-xdist, whose workers split this module, each case starts when asked."""
  pool = concurrent.futures.ThreadPoolExecutor(4)
  argv = {name: ["run", f"--config={SMOKE}", *TINY, f"--workdir={_TMP}/run_{name}", *args]
          for name, (args, _, _) in ERRORS.items()}
  argv.update(HELP)
  jobs = {}
  start = lambda name: jobs.get(name) or jobs.setdefault(name, pool.submit(_cli, argv[name]))
  if "PYTEST_XDIST_WORKER" not in os.environ:
    for name in argv:
      start(name)
  yield start
  pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_is_one_line_on_stderr(runs, name):
  _, status, words = ERRORS[name]
  out = runs(name).result()
  assert out.returncode == status, out.stderr[-3000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr[-3000:]  # no traceback, no absl usage text
  assert lines[0].startswith("fedjax-sim: error: ")
  for w in words:
    assert w in lines[0], lines[0]
  assert "Traceback" not in out.stderr and out.stdout == ""
  assert not os.path.exists(f"{_TMP}/run_{name}/checkpoints")  # nothing ran


def test_help_lists_commands_flags_and_examples(runs):
  for name in ("help", "run_help"):
    out = runs(name).result()
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for cmd in ("run", "sweep"):
      assert any(line.split()[:1] == [cmd] and len(line.split()) > 3
                 for line in text.splitlines()), f"{cmd} with a description:\n{text}"
    for flag in ("--config=", "--config.<key>=<value>", "--workdir", "--resume",
                 "--distributed"):
      assert flag in text, flag
    examples = [l for l in text.splitlines() if l.strip().startswith("fedjax-sim ")]
    assert len(examples) >= 3, text
  sweep = runs("sweep_help").result()
  assert sweep.returncode == 0, sweep.stderr
  for flag in ("--grid", "--seeds", "--sweep_file", "--backend", "--config.<key>=<value>"):
    assert flag in sweep.stdout, flag


def test_format_summary_prints_counts_as_integers():
  cfg = cli_main.config_from_argv(["fedjax-sim", f"--config={SMOKE}"])
  row = {"round": 3, "test_accuracy": 0.912345, "test_loss": 0.25,
         "comm/upload_scalars_per_round": 1104200.0, "comm/broadcast_scalars_per_round": 12.5,
         "train_time_s": 1234.5}
  lines = cli_main.format_summary(row, cfg, "runs/x").splitlines()
  cell = {l[:30].strip(): l[30:].strip() for l in lines if len(l) == 44}
  assert cell["uploaded scalars / round"] == "1,104,200"
  assert cell["broadcast scalars / round"] == "12.5000"  # not a whole number: not a count
  assert cell["global test accuracy"] == "0.9123"
  assert cell["global test loss"] == "0.2500"
  assert cell["training time (s)"] == "1234.5000"
  # an algorithm with its own metrics: every float shown, counts still as integers
  own = cli_main.format_summary({"round": 1, "knn_accuracy": 0.5,
                                 "comm/upload_scalars_total": 2000000.0}, cfg, "runs/x")
  assert "2,000,000" in own and "0.5000" in own


def test_config_from_argv_parses_like_the_config_flag():
  args = ["fedjax-sim", f"--config={SMOKE}", "--config.rounds", "3", "--noconfig.progress",
          "--config.model_kwargs.hidden=(8, 4)", "--config.data.alpha=0.1"]
  got = cli_main.config_from_argv(args)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=args)
  fv(args)
  from fedjax_sim.launch.experiment import complete_config
  complete_config(fv.config)  # the CLI also lists the method's knobs (cfg.<algorithm>)
  assert got.to_dict() == fv.config.to_dict()
  assert (got.rounds, got.progress, got.model_kwargs.hidden, got.data.alpha) == (
      3, False, (8, 4), 0.1)
  with pytest.raises(UsageError, match="put --config first"):
    cli_main.config_from_argv(["fedjax-sim", "--config.rounds=3", f"--config={SMOKE}"])
  with pytest.raises(UsageError, match=r"--config\.data\.alpha"):  # right leaf, wrong group
    cli_main.config_from_argv(["fedjax-sim", "--config.alpha=0.1"])
  with pytest.raises(UsageError, match="group of settings"):
    cli_main.config_from_argv(["fedjax-sim", "--config.data={'alpha': 0.1}"])
  with pytest.raises(UsageError, match="expected a number"):
    cli_main.config_from_argv(["fedjax-sim", "--config.client_lr=fast"])


# --------------------------------------------------------------------------- property test

_DEFAULTS = cli_main.config_keys(cli_main.config_from_argv(["fedjax-sim"]))
_ODD = st.one_of(  # out of range or of the wrong type for most keys
    st.integers(-3, 40).map(str),
    st.sampled_from(["-1", "0", "2147483648", "-2147483649", "9223372036854775808", "0x10", "",
                     "None", "true", "(0,)", "(-2,)", "('a',)", "(1.5,)", "[3]", "{}"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8))


def _values(default):
  """Strings for a key: half of its own type and in a plausible range, half odd."""
  if isinstance(default, bool):
    typed = st.sampled_from(["true", "false"])
  elif isinstance(default, int):
    typed = st.integers(0, 12).map(str)
  elif isinstance(default, float):
    typed = st.floats(0, 2).map(repr)
  elif isinstance(default, tuple):
    typed = st.sampled_from(["(16,)", "(8, 4)", "()", "16"])
  else:  # names
    typed = st.sampled_from(["mlp", "cnn", "uniform", "availability", "sgd", "adam", "iid",
                             "dirichlet", "pathological", "quantity_skew", "digits", "synthetic",
                             "fedavg", "fedprox"])
  return st.one_of(typed, _ODD)


# The run is FedAvg or FedProx (the model pools' archs are left out).
_RUN_KEYS = sorted(k for k in _DEFAULTS if not k.startswith("archs"))
_KNOWN = st.sampled_from(_RUN_KEYS).flatmap(
    lambda k: _values(_DEFAULTS[k]).map(lambda v: f"--config.{k}={v}"))
_UNKNOWN = st.tuples(st.from_regex(r"[a-z_]{1,10}(\.[a-z_]{1,8})?", fullmatch=True), _ODD).map(
    lambda kv: f"--config.{kv[0]}={kv[1]}")
_OVERRIDE = st.one_of(_KNOWN, _KNOWN, _KNOWN, _UNKNOWN)  # about 1 in 4 keys unknown


def _tiny_config_file() -> str:
  path = os.path.join(_TMP, "tiny.py")
  with open(path, "w") as f:
    f.write("from fedjax_sim.launch.configs.base import get_base_config\n\n\n"
            "def get_config():\n  c = get_base_config()\n"
            "  c.data.num_clients, c.clients_per_round, c.model_kwargs.hidden = 10, 2, (16,)\n"
            "  c.rounds, c.rounds_per_call, c.chunk_size, c.progress = 1, 1, 0, False\n"
            "  return c\n")
  return path


# Before validate_config checked them, these ended in a traceback (the exception noted), ran
# wrongly (max_checkpoints=0 kept no checkpoint, so nothing could resume), or failed with a
# misleading message (alpha=inf: "raise --config.data.alpha" after 1000 draws). Found by the
# property test below (the sampler) and a sweep of every config key with 29 values each.
@pytest.mark.parametrize("override,match", [
    ("sampler=bogus", "unknown sampler 'bogus'.*--config.sampler"),  # ValueError
    ("server_optimizer=bogus", "unknown server optimizer.*--config.server_optimizer"),
    ("model=cnn", r"model_kwargs.hidden does not apply to model 'cnn'"),  # TypeError
    ("model_kwargs.hidden=(0,)", r"model_kwargs.hidden=\(0,\).*>= 1"),  # ZeroDivisionError
    ("model_kwargs.hidden=('a',)", r"model_kwargs.hidden=\('a',\).*>= 1"),  # TypeError
    ("model_kwargs.hidden=(2147483648,)", "does not fit in int32"),  # XLA aborts the process
    ("batch_size=2147483648", "batch_size=2147483648 does not fit in int32"),  # MemoryError
    ("seed=2147483648", "seed=2147483648 does not fit in int32"),  # sweeps trace it as int32
    ("max_checkpoints=-1", "max_checkpoints=-1 must be >= 1"),  # Orbax ValueError
    ("max_checkpoints=0", "max_checkpoints=0 must be >= 1"),  # silently kept no checkpoint
    ("data.alpha=inf", "data.alpha=inf must be a finite number"),
])
def test_values_that_crashed_fail_with_one_line(override, match):
  cfg = cli_main.config_from_argv(["fedjax-sim", f"--config={_tiny_config_file()}",
                                   f"--config.{override}"])
  with pytest.raises(FedSimError, match=match) as err:
    build_experiment(cfg)
  assert "\n" not in str(err.value)


# derandomize: the same 25 draws every run (4 of them train), so the suite is reproducible;
# a 150-draw random run (40 trained) found nothing further.
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(overrides=st.lists(_OVERRIDE, min_size=1, max_size=2))
def test_random_overrides_train_or_fail_with_one_line(overrides):
  """Every draw either runs a round or raises the project's own one-line error."""
  argv = ["fedjax-sim", f"--config={_tiny_config_file()}", *overrides]
  try:
    cfg = cli_main.config_from_argv(argv)
    exp = build_experiment(cfg)
  except (FedSimError, DatasetError, PartitionError) as err:
    event(type(err).__name__)
    assert str(err) and "\n" not in str(err), repr(str(err))
    return
  state = init_state(exp.algorithm, exp.sampler, exp.data.num_clients, cfg.seed, exp.mesh)
  round_fn = make_round(exp.algorithm, exp.sampler, seed=cfg.seed, mesh=exp.mesh,
                        chunk_size=cfg.chunk_size or None, rounds_per_call=1)
  state, _ = round_fn(state, exp.data.train)
  assert int(jax.device_get(state.round)) == 1
  event("trained one round")


def test_method_knobs_sit_in_the_methods_sub_dict():
  """--config.<algorithm>.<knob> exists for every knob of the selected method, with the
  constructor's default, also when the command line switches the algorithm."""
  from fedjax_sim.algorithms import knob_defaults
  from fedjax_sim.errors import ConfigError
  from fedjax_sim.launch.experiment import validate_config
  cfg = cli_main.config_from_argv(["fedjax-sim", f"--config={SMOKE}",
                                   "--config.algorithm=fedprox", "--config.fedprox.mu=0.5"])
  assert cfg.algorithm == "fedprox" and cfg.fedprox.mu == 0.5
  cfg = cli_main.config_from_argv(["fedjax-sim", f"--config={SMOKE}",
                                   "--config.algorithm=fedmdfg"])
  assert cfg.fedmdfg.to_dict() == knob_defaults("fedmdfg")  # theta 11.25, s 5, ...
  with pytest.raises(UsageError, match="fedprox.mu"):  # the closest valid key is named
    cli_main.config_from_argv(["fedjax-sim", f"--config={SMOKE}", "--config.algorithm=fedprox",
                               "--config.fedprox.muu=0.5"])
  with cfg.unlocked():
    cfg.fedmdfg.nope = 1
  with pytest.raises(ConfigError, match="fedmdfg has no knob nope"):
    validate_config(cfg)
