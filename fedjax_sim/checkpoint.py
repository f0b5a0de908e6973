"""Orbax checkpoints of the whole simulation state, between rounds."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from fedjax_sim.errors import CheckpointError


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` keyed by round number.

  Saves are asynchronous (the device-to-host copy is synchronous, so the
  caller may donate the state right after ``save``).
  """

  def __init__(self, directory: str, max_to_keep: Optional[int] = 3):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_round(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, round_: int, state: Any) -> None:
    self.manager.save(round_, args=ocp.args.StandardSave(state))

  def restore(self, template: Any, round_: Optional[int] = None) -> Any:
    """Restores into the structure/shardings of ``template`` (a SimState).

    Raises:
      CheckpointError: none saved, or unreadable/mismatched (names the path).
    """
    step = self.latest_round() if round_ is None else round_
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}; run without --resume first.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # orbax raises many types for corrupt/mismatched data
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} could not be restored ({type(err).__name__}: "
          f"{str(err).splitlines()[0][:200]}). If the config changed, resume with the saved "
          f"config.json; if the files are corrupt, delete {self.directory}/{step} to fall back "
          "to an earlier round.") from err

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
