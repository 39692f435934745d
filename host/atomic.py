"""Atomic file writes: a temporary file in the target's folder, then a rename.

A crash or an error never leaves half a file at the target (the temporary file is removed).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a fresh temporary path next to `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # `.<name>.<pid>-<random>.tmp`: the pid lets the next run remove it if this process is killed
    # (host.outputs.remove_stale_temp_files)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, data: Any, **dump_options: Any) -> Path:
    """`atomic_write` of a JSON document (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, **dump_options), encoding="utf-8"))
