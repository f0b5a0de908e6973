"""Writing a benchmark report while keeping its hand-written notes section."""
from __future__ import annotations

import os

NOTES = "## Notes (hand-written; kept when the script rewrites the measured part above)"


def write_keeping_notes(path: str, text: str) -> None:
  """Writes ``text`` to ``path``, followed by the ``NOTES`` section of the file already there
  (if any), so that a rerun refreshes the measured part and keeps the notes."""
  notes = ""
  if os.path.exists(path):
    old = open(path).read()
    if NOTES in old:
      notes = "\n" + old[old.index(NOTES):]
  with open(path, "w") as f:
    f.write(text + notes)
