"""Example sweep files (`get_sweep()`), see docs/sweeps.md."""
