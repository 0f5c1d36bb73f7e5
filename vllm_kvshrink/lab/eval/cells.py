"""Cell files of an evaluation: one JSON file per finished (task, method,
budget), written so that an interrupted run never leaves half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
