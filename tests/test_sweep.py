"""Sweeps: grid points and run directories, resume, vectorized == separate runs, the
summary's metric columns, and a real SLURM job array (submitted by submitit) on a one-node
localhost cluster.

One 8-point vectorized sweep (2 client_lr x 2 mu x 2 seeds, FedProx, digits)
is shared by the tests (module fixture), so the suite compiles it once.
"""
import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from fedjax_sim.launch import sweep as sw
import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_KEYS = set(sw.TIMING_KEYS)


def tiny_config():
  return conftest.tiny_config(algorithm="fedprox", rounds=2, eval_every=1, checkpoint_every=2,
                              rounds_per_call=1, chunk_size=0)


GRID = {"client_lr": ["0.05", "0.1"], "fedprox.mu": ["0", "0.01"]}


def assert_metrics_close(a: dict, b: dict, what: str):
  """Same keys; numeric values allclose (timings and labels such as ``mode`` aside)."""
  assert set(a) - SKIP_KEYS == set(b) - SKIP_KEYS, what
  num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  for k in sorted(k for k in set(a) - SKIP_KEYS if num(a[k])):
    np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=2e-4, atol=2e-5,
                               err_msg=f"{what}: {k}")


def run_grid(tmp_path):
  cfg = tiny_config()
  points = sw.make_points(cfg, GRID, seeds=[0, 1])
  workdir = str(tmp_path / "grid")
  logs = []
  rows = sw.run_sweep(cfg, points, workdir, log=logs.append)
  return cfg, points, workdir, rows, logs


def test_grid_points_and_tasks():
  cfg = tiny_config()
  points = sw.make_points(cfg, sw.parse_grid(["client_lr=0.05,0.1", "fedprox.mu=0,0.01"]),
                          ["0", "1"])
  assert len(points) == 8 and len({p.name for p in points}) == 8
  assert points[0].overrides == {"client_lr": 0.05, "fedprox.mu": 0.0, "seed": 0}
  assert isinstance(points[0].overrides["fedprox.mu"], float)  # typed like the config field
  assert sw.plan_tasks(cfg, points, vectorize=True) == [list(range(8))]
  assert sw.plan_tasks(cfg, points, vectorize=False) == [[i] for i in range(8)]
  # The partition's alpha changes data shapes: one task per alpha value.
  pts = sw.make_points(cfg, {"data.alpha": [0.1, 0.5], "client_lr": [0.05, 0.1]})
  assert sorted(map(len, sw.plan_tasks(cfg, pts, vectorize=True))) == [2, 2]
  with pytest.raises(KeyError, match="no_such_key"):
    sw.make_points(cfg, {"no_such_key": [1]})


def check_eight_rows(points, workdir, rows, logs):
  assert len(rows) == 8 and all(r["status"] == "ok" for r in rows), rows
  assert all(r["mode"] == "vectorized[8]" for r in rows)
  assert any("vectorized 8 points" in m for m in logs), logs
  with open(os.path.join(workdir, "summary.csv")) as f:
    table = list(csv.DictReader(f))
  assert len(table) == 8
  assert [t["point"] for t in table] == [p.name for p in points]
  for name in ("summary.md", "summary_curves.png", "summary_final.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  for p in points:  # every point is a normal run directory
    d = os.path.join(workdir, p.name)
    for name in ("config.json", "metrics.jsonl", "plots.png", "result.json", "checkpoints"):
      assert os.path.exists(os.path.join(d, name)), (p.name, name)
    with open(os.path.join(d, "config.json")) as f:
      assert json.load(f)["client_lr"] == p.overrides["client_lr"]


def check_rerun_skips(cfg, points, workdir, rows, monkeypatch):
  boom = lambda *a, **k: pytest.fail("a finished point ran again")
  monkeypatch.setattr(sw, "run_task", boom)
  logs = []
  again = sw.run_sweep(cfg, points, workdir, log=logs.append)
  assert "8 point(s) already finished, 0 task(s) to run" in logs[0]
  assert again == rows
  monkeypatch.undo()
  # A lost result: only that point runs again (resuming its saved final checkpoint).
  os.remove(os.path.join(workdir, points[5].name, "result.json"))
  logs = []
  again = sw.run_sweep(cfg, points, workdir, log=logs.append)
  assert "7 point(s) already finished, 1 task(s) to run" in logs[0]
  assert [m for m in logs if m.startswith(points[5].name)], logs
  assert_metrics_close(again[5], rows[5], "resumed point")


def check_vectorized_equals_separate(cfg, points, workdir, tmp_path):
  from fedjax_sim.launch.experiment import train_and_evaluate
  for i in (3, 6):  # (0.05, mu=0.01, seed 1) and (0.1, mu=0.01, seed 0)
    p = points[i]
    final = train_and_evaluate(sw.apply_overrides(cfg, p.overrides), str(tmp_path / p.name))
    res = sw.load_result(workdir, p)
    assert res["mode"] == "vectorized[8]"
    assert_metrics_close(res["metrics"], final, p.name)
    hist = lambda d: [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    h_vec, h_sep = hist(os.path.join(workdir, p.name)), hist(str(tmp_path / p.name))
    assert len(h_vec) == len(h_sep) == cfg.rounds + 1
    for a, b in zip(h_vec, h_sep):
      assert_metrics_close(a, b, f"{p.name} round {a['round']}")


def test_grid_sweep_rows_rerun_and_vectorized_equals_separate(tmp_path, monkeypatch):
  """One test, so the 8-point program compiles once even under pytest-xdist."""
  cfg, points, workdir, rows, logs = run_grid(tmp_path)
  check_eight_rows(points, workdir, rows, logs)  # 2x2 grid x 2 seeds: 8 result rows
  check_rerun_skips(cfg, points, workdir, rows, monkeypatch)  # resumable
  check_vectorized_equals_separate(cfg, points, workdir, tmp_path)  # allclose


def _slurm_works(env) -> bool:
  try:
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env,
                         timeout=20)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


# Where .ci/run (and this test, when it has to) starts the localhost cluster.
SLURM_DIR = os.environ.get("FEDJAX_SLURM_DIR", "/tmp/fedjax-sim-slurm")


@pytest.fixture(scope="module")
def slurm_cluster():
  """A working SLURM cluster: SLURM_CONF (or the default config) if sinfo answers, else
  the one .ci/slurm-localhost runs under SLURM_DIR, else start that (needs root) for this
  module and stop it afterwards."""
  if _slurm_works(os.environ):
    yield os.environ.get("SLURM_CONF")
    return
  conf = os.path.join(SLURM_DIR, "slurm.conf")
  env = dict(os.environ, SLURM_CONF=conf)
  started = False
  if not (os.path.exists(conf) and _slurm_works(env)):
    if os.geteuid() != 0:
      pytest.skip("no SLURM cluster answers sinfo, and starting .ci/slurm-localhost needs root")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
      pytest.skip("no SLURM cluster, and .ci/slurm-localhost needs apt-get to install slurm-wlm")
    script = os.path.join(REPO, ".ci", "slurm-localhost")
    out = subprocess.run([script, "start", SLURM_DIR], capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0 or not _slurm_works(env):
      subprocess.run([script, "stop", SLURM_DIR], capture_output=True)  # partial start
      pytest.skip(f".ci/slurm-localhost could not start a cluster: {out.stderr.strip()[-500:]}")
    started = True
  old = os.environ.get("SLURM_CONF")
  os.environ["SLURM_CONF"] = conf
  try:
    yield conf
  finally:
    # Under pytest-xdist another worker may still be using the cluster this one started:
    # leave it running then (.ci/run stops the one it starts; /tmp holds its state).
    if started and not os.environ.get("PYTEST_XDIST_WORKER"):
      subprocess.run([os.path.join(REPO, ".ci", "slurm-localhost"), "stop", SLURM_DIR],
                     capture_output=True)
    if old is None:
      os.environ.pop("SLURM_CONF", None)
    else:
      os.environ["SLURM_CONF"] = old


def test_slurm_array_sweep_matches_local(slurm_cluster, tmp_path):
  """4 points (2 client_lr x 2 seeds) as one sbatch --array job == the local back end."""
  cfg = tiny_config()
  points = sw.make_points(cfg, {"client_lr": GRID["client_lr"]}, seeds=[0, 1])
  logs = []
  rows = sw.run_sweep(cfg, points, str(tmp_path / "slurm"), backend="slurm",
                      slurm=sw.SlurmOptions(time="00:10:00", poll_s=1.0, timeout_s=600),
                      log=logs.append)
  submitted = [m for m in logs if "submitted SLURM array job" in m]
  assert submitted, logs
  script_path = submitted[0].rsplit(": ", 1)[1]  # submitit's <job>_submission.sh
  assert os.path.dirname(script_path) == str(tmp_path / "slurm" / "sweep" / "slurm")
  with open(script_path) as f:
    script = f.read()
  assert "#SBATCH --array=0-3%4" in script and sw.python_executable() in script
  assert "#SBATCH --time=10" in script and "#SBATCH --job-name=fedjax-sweep" in script
  assert not any("failed" in m for m in logs), logs
  assert all(r["status"] == "ok" and r["mode"] == "single" for r in rows), rows
  local = sw.run_sweep(cfg, points, str(tmp_path / "local"), log=lambda m: None)
  assert all(r["mode"] == "vectorized[4]" for r in local), local
  assert [r["point"] for r in local] == [r["point"] for r in rows]
  read = lambda d: list(csv.DictReader(open(tmp_path / d / "summary.csv")))
  s_slurm, s_local = read("slurm"), read("local")
  assert len(s_slurm) == len(s_local) == 4
  for a, b in zip(s_slurm, s_local):
    assert a["point"] == b["point"] and a["status"] == b["status"] == "ok"
    metrics = lambda r: {k: float(v) for k, v in r.items()
                         if k not in ("point", "status", "mode", "error", *sw.TIMING_KEYS)}
    assert_metrics_close(metrics(a), metrics(b), a["point"])


def test_slurm_failed_tasks_are_reported(slurm_cluster, tmp_path):
  """A point that fails (an unknown model) ends its array index FAILED; the driver logs the
  task with its error and log file, and the summary says failed."""
  cfg = tiny_config()
  points = sw.make_points(cfg, {"model": ["no_such_model_a", "no_such_model_b"]})
  logs = []
  rows = sw.run_sweep(cfg, points, str(tmp_path / "bad"), backend="slurm",
                      slurm=sw.SlurmOptions(time="5", poll_s=1.0, timeout_s=300),
                      log=logs.append)
  assert [r["status"] for r in rows] == ["failed", "failed"], rows
  assert "unknown model" in rows[0]["error"]
  for t in (0, 1):
    line = [m for m in logs if m.startswith(f"task {t} failed (")]
    assert line and "TaskFailed" in line[0] and "_log.out" in line[0], logs


def test_slurm_settings_without_a_cluster(tmp_path):
  """--slurm_time and --slurm_args become submitit's parameters (no cluster needed)."""
  from fedjax_sim.errors import ConfigError
  from fedjax_sim.launch import sweep_backends as sb
  assert [sb.slurm_minutes(s) for s in ("90", "01:00:00", "10:30", "1-2", "1-0:30", "0:0:1")] \
      == [90, 60, 11, 1560, 1470, 1]
  with pytest.raises(ConfigError, match="--slurm_time"):
    sb.slurm_minutes("one hour")
  assert sb.sbatch_options("--account=abc --qos high --exclusive") == {
      "account": "abc", "qos": "high", "exclusive": True}
  with pytest.raises(ConfigError, match="long sbatch option"):
    sb.sbatch_options("-A abc")
  if shutil.which("sbatch") is None or shutil.which("srun") is None:
    pytest.skip("the SLURM client tools (sbatch, srun) are not installed")
  script = sw.slurm_script(str(tmp_path), [3, 7], sw.SlurmOptions(
      partition="gpu", time="02:00:00", gpus=1, cpus=4, mem="8G", max_parallel=1,
      extra="--account=abc --qos=high"))
  for line in ("--array=0-1%1", "--partition=gpu", "--time=120", "--gres=gpu:1",
               "--cpus-per-task=4", "--mem=8G", "--account=abc", "--qos=high",
               f"--chdir={os.getcwd()}"):
    assert f"#SBATCH {line}\n" in script, (line, script)
  assert "srun" not in script and sw.python_executable() in script


def test_summary_metric_columns(tmp_path):
  """summary.md shows the standard metrics, then any other numeric final metric a method
  logs (delta_pct); diagnostics, comm counters and wall time stay in summary.csv."""
  cfg = tiny_config()
  points = sw.make_points(cfg, {"client_lr": ["0.05", "0.1"]}, seeds=[0, 1])
  rows = []
  for i, p in enumerate(points):
    rows.append({"point": p.name, **p.overrides, "status": "ok", "mode": "single",
                 "round": 2, "test_accuracy": 0.5 + 0.1 * i, "train_loss": 1.0,
                 "delta_pct": 2.0 * i, "jain_index": 0.9, "comm/upload_scalars_total": 10.0,
                 "server/update_norm": 0.3, "wall_s": 1.0, "train_time_s": 0.5})
  assert sw.summary_metrics(points, rows) == ["round", "test_accuracy", "train_loss",
                                              "train_time_s", "delta_pct"]
  assert sw.summary_metrics(points, rows, keys=["delta_pct", "nope"]) == ["delta_pct"]
  workdir = str(tmp_path / "s")
  os.makedirs(workdir)
  paths = sw.write_summary(workdir, points, rows)
  md = open(paths["md"]).read()
  assert "| client_lr | seed | status | round | test_accuracy | train_loss | train_time_s | " \
      "delta_pct |" in md, md
  assert "| test_accuracy | train_loss | delta_pct |" in md  # mean ± std over seeds
  assert "| client_lr=0.1 | 2 | 0.75 ± 0.071 | 1 ± 0 | 5 ± 1.4 |" in md, md
  header = next(csv.reader(open(paths["csv"])))
  assert {"delta_pct", "jain_index", "comm/upload_scalars_total", "wall_s"} <= set(header)
