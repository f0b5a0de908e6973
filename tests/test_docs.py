"""Every python code block in README.md and docs/*.md runs (one namespace per file,
top to bottom), and so does every bash block of the algorithm guide, and every
script in examples/."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(path, lang):
  with open(path) as f:
    return re.findall(rf"```{lang}\n(.*?)```", f.read(), flags=re.S)


DOCS = [p for p in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(f"{ROOT}/docs/*.md"))]
        if _blocks(p, "python")]


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_python_blocks_run(path, monkeypatch):
  monkeypatch.chdir(ROOT)
  namespace = {"__name__": "__docs__"}
  for i, block in enumerate(_blocks(path, "python")):
    try:
      exec(compile(block, f"{os.path.relpath(path, ROOT)}[block {i}]", "exec"), namespace)
    except Exception as err:
      raise AssertionError(f"block {i} of {path} failed: {err!r}\n{block}") from err


def test_guide_bash_blocks_run():
  guide = os.path.join(ROOT, "docs", "writing_an_algorithm.md")
  bin_dir = os.path.dirname(sys.executable)
  for block in _blocks(guide, "bash"):
    cmd = block.replace(".venv/bin/", bin_dir + "/")
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"{block}\n{out.stderr[-2000:]}"


EXAMPLES = sorted(glob.glob(f"{ROOT}/examples/*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_examples_run(path):
  out = subprocess.run([sys.executable, path], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, FEDJAX_SIM_EXAMPLE_SMOKE="1"))
  assert out.returncode == 0, out.stderr[-3000:]
