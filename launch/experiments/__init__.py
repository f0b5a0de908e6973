"""Experiment drivers: scripts that reproduce a report in docs/results (python -m fedjax_sim.launch.experiments.<name>)."""
