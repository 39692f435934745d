"""Content hashes of model files (sha256), computed once and cached in a small JSON file.

The cache is keyed by absolute path, size and modification time, so a replaced file is hashed again.
A folder (a diffusers layout) hashes to the sha256 of its files' relative paths and hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from host.atomic import atomic_write_json

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
BIG_FILE = 1_000_000_000  # bytes


class HashCache:
    """sha256 of files, remembered in `cache_file` between runs."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        self._entries: dict[str, str] | None = None

    def sha256(self, path: Path) -> str:
        """Hex sha256 of a file, or of a folder's files (sorted by relative path)."""
        path = path.resolve()
        if path.is_dir():
            digest = hashlib.sha256()
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{file.relative_to(path).as_posix()}\0{self.sha256(file)}\n".encode())
            return digest.hexdigest()
        stat = path.stat()
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        entries = self._load()
        if key not in entries:
            entries[key] = _hash_file(path)
            self._save()
        return entries[key]

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.cache_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def _save(self) -> None:
        """Atomic rewrite; a read-only location only costs re-hashing next time."""
        try:
            atomic_write_json(self.cache_file, self._entries, indent=1, sort_keys=True)
        except OSError as exc:
            log.warning("could not write the hash cache %s: %s", self.cache_file, exc)


def _hash_file(path: Path) -> str:
    size = path.stat().st_size
    # A multi-GB file takes a while: say so, or the pause after the last step looks like a hang.
    level = logging.WARNING if size > BIG_FILE else logging.INFO
    log.log(level, "computing the sha256 of %s (%.1f GB) for the image metadata, once (cached)", path.name, size / 1e9)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
