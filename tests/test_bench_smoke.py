"""Smoke test of bench/throughput.py: its core function runs, and the vectorized
round and the per-client reference loop it times compute the same thing.

An equivalence test, never a timing assertion.
"""
import importlib.util
import math
import os
import sys

import jax
import numpy as np

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "throughput.py")


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_throughput", _PATH)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def test_vectorized_round_matches_reference_loop():
  bench = _load_bench()
  setup = bench.make_setup("digits", num_clients=20, clients_per_round=5, hidden=(32,))
  # Plain vmap (1 round per call), and chunks of 2 with 2 rounds fused by lax.scan.
  res = bench.run_case(setup, [(None, 1), (2, 2)], rounds_per_sweep=2, sweeps=1,
                       xla_memory=False, log=lambda *a: None)
  ref_params = res["ref_params"]
  assert len(ref_params) >= 2
  for runner in res["runners"][1:]:
    want = ref_params[runner.rounds_per_call - 1]
    got = runner.params_after_first
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=runner.label)
    assert res["max_param_diff"][runner.label] < 1e-5
    # The server actually moved (the comparison is not between two initial models).
    init = ref_params[0]
    assert runner.rounds_per_call == 1 or any(
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(init)))
    assert 0 < runner.padding_efficiency <= 1

  rows = bench.case_rows(res, peak_gflops=100.0)
  assert [r["variant"] for r in rows] == ["reference loop", "vmap chunk=all R=1",
                                          "vmap chunk=2 R=2"]
  for r in rows:
    assert math.isfinite(r["rounds_per_s"]) and r["rounds_per_s"] > 0
    assert r["useful_gflops"] > 0
  table = bench.markdown_table(rows)
  assert table.count("\n") == len(rows) + 1
  assert "| digits C=20 | 5 |" in bench.summary_table(rows)


def test_train_flops_per_example():
  bench = _load_bench()
  # 64-200-200-10: forward 2*(12800+40000+2000), dW the same, dX without the first layer.
  assert bench.train_flops_per_example((64, 200, 200, 10)) == (
      2 * 54800 + 2 * 54800 + 2 * (40000 + 2000))
