"""Shipped experiment configs (``get_config()`` returning an ml_collections ConfigDict)."""
import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
  """Absolute path of a shipped config file, e.g. ``path('fedavg_digits')``."""
  return os.path.join(CONFIG_DIR, f"{name}.py")
