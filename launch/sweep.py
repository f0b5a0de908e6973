"""``fedjax-sim sweep``: hyperparameter grids (placeholder until the sweep issue lands)."""


def main(flags) -> int:
  raise SystemExit("fedjax-sim sweep: not implemented yet (issue 8).")
