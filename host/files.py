"""Model files: pick the variant, find it in the checkpoint folders, download what is missing.

A file entry is an https URL (Hugging Face `.../resolve/<rev>/<path>` or any other), an absolute
local path (file or diffusers folder), or a path relative to the checkpoint folders. URLs are looked
up under their repository path first (`Qwen3/config.json` -> `ckpts/Qwen3/config.json`) and
downloaded there when missing. Extra folders (a ComfyUI models folder, a Hugging Face cache) are
searched recursively by file name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import MissingFilesError
from host.registry import REPO_ROOT

log = logging.getLogger(__name__)

DEFAULT_CKPTS = REPO_ROOT / "ckpts"
HF_URL = re.compile(r"^(?P<endpoint>https?://[^/]+)/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
# Wan2GP also writes Hub files as https://huggingface.co/<owner>/<repo>/<path>, without /resolve/<rev>/ (its
# TwinFlow preset does); the Hub serves files only under /resolve/, so that form means the file at revision main.
HF_SHORT_URL = re.compile(r"^https://huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?!(?:resolve|blob|tree|raw)/)(?P<path>.+)$")
DTYPE_TOKENS = {
    "int8": "int8",
    "qint8": "int8",
    "fp8": "fp8",
    "bf16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
}
MAX_SEARCH_DEPTH = 8
WEIGHT_SUFFIXES = {".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin"}


@dataclass(frozen=True)
class FileSpec:
    """One file a model needs, with its variants (e.g. bf16 and int8 of the same weights)."""

    role: str
    variants: tuple[str, ...]


@dataclass(frozen=True)
class FileEntry:
    """One variant, parsed: where it lives locally and where it can be downloaded from."""

    role: str
    entry: str  # as written in the preset
    relpath: str | None  # path inside a checkpoint folder (None for an absolute path)
    absolute: Path | None
    url: str | None

    @property
    def name(self) -> str:
        return PurePosixPath(self.relpath).name if self.relpath else str(self.absolute)


@dataclass(frozen=True)
class MissingFile:
    """A file not found anywhere: what, from where, to where."""

    role: str
    name: str
    url: str | None
    target: Path
    reason: str = ""


def dtype_of(name: str) -> str:
    """The dtype token of a file name: 'ZImageBase_quanto_bf16_int8' -> 'int8' (the last token wins). The whole
    name is read, dots included: 'Controlnet-Union2.1_quanto_bf16_int8.safetensors' is int8 too."""
    stem = PurePosixPath(name.rstrip("/")).name
    found = [DTYPE_TOKENS[t] for t in re.split(r"[_\-.]", stem.lower()) if t in DTYPE_TOKENS]
    return found[-1] if found else "unknown"


def pick_variant(variants: Iterable[str], quantization: str) -> str:
    """The variant whose dtype token matches `quantization`; else bf16; else the first one."""
    variants = list(variants)
    if not variants:
        raise MissingFilesError("a preset lists no file for a required part (empty URLs list)")
    for wanted in (quantization, "bf16"):
        for entry in variants:
            if dtype_of(entry) == wanted:
                return entry
    unquantized = [v for v in variants if dtype_of(v) != "int8"]
    return (unquantized or variants)[0]


def parse_entry(role: str, entry: str) -> FileEntry:
    """Split a preset entry into its local path and its download URL."""
    match = HF_URL.match(entry)
    if match:
        return FileEntry(role, entry, match["path"], None, entry)
    match = HF_SHORT_URL.match(entry)
    if match:
        return FileEntry(role, entry, match["path"], None, f"https://huggingface.co/{match['repo']}/resolve/main/{match['path']}")
    if entry.startswith(("http://", "https://")):
        return FileEntry(role, entry, PurePosixPath(entry.split("?")[0]).name, None, entry)
    path = Path(entry).expanduser()
    if path.is_absolute():
        return FileEntry(role, entry, None, path, None)
    return FileEntry(role, entry, PurePosixPath(entry).as_posix(), None, None)


@dataclass
class CheckpointFolders:
    """`primary` (default ckpts/) receives downloads; `extra` folders are searched too."""

    primary: Path = DEFAULT_CKPTS
    extra: list[Path] = field(default_factory=list)
    _index: dict[Path, dict[str, list[Path]]] = field(default_factory=dict, repr=False)

    def locate(self, relpath: str) -> Path | None:
        """First existing match: <folder>/<relpath>, then (weights only) <folder>/<file name>, then a recursive search.

        Generic names (`config.json`, `tokenizer.json`) only match inside a folder of the same name
        as in `relpath` (`Qwen3/`); weight file names are distinctive enough to match anywhere.
        """
        rel = PurePosixPath(relpath)
        for folder in (self.primary, *self.extra):
            candidates = (folder / rel, folder / rel.name) if _distinctive(rel) else (folder / rel,)
            for candidate in candidates:
                if candidate.exists():
                    return candidate
        for folder in self.extra:
            found = self._search(folder, rel)
            if found is not None:
                return found
        return None

    def target(self, relpath: str) -> Path:
        return self.primary / PurePosixPath(relpath)

    def _search(self, folder: Path, rel: PurePosixPath) -> Path | None:
        """Recursive search by name (plus the parent folders for generic names)."""
        if folder not in self._index:
            self._index[folder] = _index_folder(folder)
        tail = rel.parts[-1:] if _distinctive(rel) else rel.parts
        for path in self._index[folder].get(rel.name, []):
            if tuple(path.parts[-len(tail) :]) == tail:
                return path
        return None


def _distinctive(rel: PurePosixPath) -> bool:
    return len(rel.parts) == 1 or rel.suffix.lower() in WEIGHT_SUFFIXES


def _index_folder(folder: Path) -> dict[str, list[Path]]:
    """File and folder names under `folder` (symlinks followed: Hugging Face caches are symlinks)."""
    index: dict[str, list[Path]] = {}
    base_depth = len(folder.parts)
    for root, dirs, files in os.walk(folder, followlinks=True):
        if len(Path(root).parts) - base_depth >= MAX_SEARCH_DEPTH:
            dirs[:] = []
        for name in (*files, *dirs):
            index.setdefault(name, []).append(Path(root) / name)
    return index


Downloader = Callable[[FileEntry, Path], Path]


def resolve_files(
    specs: Iterable[FileSpec],
    quantization: str,
    folders: CheckpointFolders,
    download: Downloader | None = None,
    model_type: str = "",
) -> dict[str, Path]:
    """role -> local path of the chosen variant; downloads what is missing (when `download` is given).

    Raises MissingFilesError listing every file still missing, its URL and where to put it.
    """
    entries = [parse_entry(spec.role, pick_variant(spec.variants, quantization)) for spec in specs]
    found = {entry.role: path for entry in entries if (path := _locate(entry, folders)) is not None}
    missing: list[MissingFile] = []
    failed = False
    for entry in (e for e in entries if e.role not in found):
        reason = ""
        if entry.url and download is not None:
            if failed:  # offline or the server is down: don't wait for every file's timeout
                reason = "not downloaded: an earlier download failed"
            else:
                path, reason = _try_download(entry, folders, download)
                if path is not None:
                    found[entry.role] = path
                    continue
                failed = True
        target = entry.absolute or folders.target(entry.relpath or entry.entry)
        missing.append(MissingFile(entry.role, entry.name, entry.url, target, reason))
    if missing:
        raise MissingFilesError(format_missing(missing, model_type, download is not None))
    return found


def _locate(entry: FileEntry, folders: CheckpointFolders) -> Path | None:
    if entry.absolute is not None:
        return entry.absolute if entry.absolute.exists() else None
    assert entry.relpath is not None
    return folders.locate(entry.relpath)


def _try_download(entry: FileEntry, folders: CheckpointFolders, download: Downloader) -> tuple[Path | None, str]:
    """Any failure (network, HTTP error, disk) becomes a reason in the missing-file report."""
    try:
        return download(entry, folders.primary), ""
    except Exception as exc:  # noqa: BLE001 - every download failure is reported, not raised
        log.info("download of %s failed: %s", entry.url, exc)
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"download failed: {type(exc).__name__}: {first_line}"


def format_missing(missing: list[MissingFile], model_type: str, tried_download: bool) -> str:
    """The message a user sees: each missing file, its URL and where to put it."""
    what = f" for {model_type}" if model_type else ""
    lines = [f"{len(missing)} model file(s) missing{what}:"]
    for item in missing:
        lines.append(f"  - {item.role}: {item.name}")
        if item.url:
            lines.append(f"      download: {item.url}")
        lines.append(f"      put it at: {item.target}")
        if item.reason:
            lines.append(f"      {item.reason}")
    if tried_download:
        lines.append("Check your connection and run again (downloads resume), or download the files by hand.")
    else:
        lines.append("Downloads are off: download the files by hand, or run again without --offline.")
    lines.append("A folder that already has them (ComfyUI models, Hugging Face cache) can be added with --checkpoints-dir.")
    return "\n".join(lines)


def download_file(entry: FileEntry, primary: Path) -> Path:
    """Download one file into `primary` at its repository path (resumable, with a progress bar)."""
    assert entry.url is not None and entry.relpath is not None
    match = HF_URL.match(entry.url)
    if match:
        from huggingface_hub import hf_hub_download

        log.info("downloading %s", entry.url)
        path = hf_hub_download(match["repo"], match["path"], revision=match["rev"], local_dir=primary, endpoint=match["endpoint"])
        return Path(path)
    return _download_plain(entry.url, primary / entry.relpath)


def _download_plain(url: str, target: Path) -> Path:
    """A non-Hugging-Face URL: resume into `<target>.incomplete`, then rename into place."""
    from huggingface_hub.file_download import http_get

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".incomplete")
    with open(partial, "ab") as handle:
        http_get(url, handle, resume_size=handle.tell(), displayed_filename=target.name)
    os.replace(partial, target)
    return target


def specs_from_model_def(model_def: Mapping[str, Any], family_files: Iterable[Mapping[str, Any]]) -> list[FileSpec]:
    """The transformer (`URLs`), the text encoder (`text_encoder_URLs`) and the family's extra files."""
    specs = [FileSpec("transformer", tuple(model_def["URLs"]))] if model_def.get("URLs") else []
    if model_def.get("text_encoder_URLs"):
        specs.append(FileSpec("text_encoder", tuple(model_def["text_encoder_URLs"])))
    roles = {s.role for s in specs}
    for item in family_files:
        if item["role"] not in roles:
            specs.append(FileSpec(str(item["role"]), tuple(item["URLs"])))
            roles.add(item["role"])
    return specs
