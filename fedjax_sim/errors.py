"""Errors with one-line messages that name the setting and the fix."""


class FedSimError(Exception):
  """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(FedSimError, ValueError):
  """A config value is invalid."""


class DivergedError(FedSimError, FloatingPointError):
  """Training produced a non-finite loss or state; the last good checkpoint is kept."""


class CheckpointError(FedSimError):
  """A checkpoint is missing, mismatched or corrupt."""


class UsageError(FedSimError, ValueError):
  """A command-line argument is invalid: an unknown ``--config.<key>``, a value of the wrong
  type, a ``--config`` file that is not a Python config, a ``--workdir`` that cannot be
  created, an unknown command."""
