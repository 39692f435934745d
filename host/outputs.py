"""Saved images: names, atomic never-overwriting writes, and the settings embedded in each file.

Each image carries the full settings JSON (PNG iTXt `wgp_settings`; EXIF UserComment in JPEG/WebP)
and an A1111-style `parameters` text (PNG text chunk; EXIF ImageDescription) so other tools show the
prompt, seed, steps and model. A PNG also carries Wan2GP's `comment` iTXt chunk: the settings in Wan2GP's
shape (host/wan2gp.py to_wan2gp), which Wan2GP reads back when the image is dropped on it; in JPEG/WebP
the one UserComment is our JSON, whose generation keys are Wan2GP's names. The JSON is a valid task:
`--process image.png` regenerates it. `read_metadata` gives any image's text metadata (PNG text chunks,
EXIF UserComment in ASCII, UTF-8 or UNICODE/UTF-16) for the readers of other tools' files (host/image_settings.py).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import unicodedata
import warnings
import zlib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin

from common.errors import SettingsError
from common.settings_schema import is_pil_image
from host.settings import MAX_TEXT_CHARS, parse_json_text
from host.wan2gp import to_wan2gp

log = logging.getLogger(__name__)

SETTINGS_KEY = "wgp_settings"
PARAMETERS_KEY = "parameters"
WAN2GP_KEY = "comment"  # Wan2GP's PNG iTXt keyword (shared/utils/audio_video.py _write_png_comment_metadata)
USER_COMMENT_KEY, DESCRIPTION_KEY = "exif:UserComment", "exif:ImageDescription"  # read_metadata's names for EXIF text
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
EXIF_IFD, USER_COMMENT, IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E
ASCII_PREFIX = b"ASCII\0\0\0"  # EXIF UserComment character-code headers (EXIF 2.3, 4.6.5 UserComment)
UNICODE_PREFIX = b"UNICODE\0"  # UCS-2; Wan2GP writes it little-endian whatever the TIFF byte order
UNDEFINED_PREFIX = b"\0" * 8
MAX_SLUG = 40
# Settings text a saved image may carry: every text setting is at most MAX_TEXT_CHARS, written as ASCII
# JSON (up to 12 bytes per character); the rest (provenance) is small.
MAX_EMBEDDED_CHARS = 4 * 12 * MAX_TEXT_CHARS


def slugify(text: str, limit: int = MAX_SLUG) -> str:
    """'A cat, on a mat!' -> 'a_cat_on_a_mat' (ASCII, at most `limit` characters)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")
    return slug[:limit].rstrip("_") or "image"


def output_name(seed: int, prompt: str, fmt: str, now: datetime | None = None) -> str:
    """`<YYYY-MM-DD_HH-MM-SS>_seed<seed>_<slug>.<ext>`."""
    stamp = (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    return f"{stamp}_seed{seed}_{slugify(prompt)}{EXTENSIONS[fmt]}"


def parameters_text(settings: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """A1111-style text: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
    lines = [str(settings.get("prompt", ""))]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {
        "Steps": settings.get("num_inference_steps"),
        "Sampler": "Euler (flow matching)",
        "CFG scale": settings.get("guidance_scale"),
        "Seed": settings.get("seed"),
        "Size": settings.get("resolution"),
        "Model hash": str(info.get("model_hash", ""))[:10] or None,
        "Model": settings.get("model_type"),
        "Shift": settings.get("flow_shift"),
        "Lora": ", ".join(f"{k}:{v}" for k, v in info.get("loras", {}).items()) or None,
        "Version": info.get("program"),
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v not in (None, "")))
    return "\n".join(lines)


def embedded_json(settings: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """The settings (a valid task) with the provenance under `generation_info`.

    An input image given as a path stays a path (and `generation_info.inputs` has its sha256); one given
    in memory (Python API) is written as null, its pixels' sha256 in `generation_info.inputs`.
    """
    return json.dumps({**embedded_settings(settings), "generation_info": dict(info)}, ensure_ascii=True, sort_keys=False)


def embedded_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings as files record them: an in-memory input image as null."""
    return {k: None if is_pil_image(v) else v for k, v in settings.items()}


def check_output_folder(folder: Path) -> Path:
    """Make sure images can be saved in `folder` before any work is done (a missing folder is not created yet).

    Raises SettingsError naming the folder when it, or the nearest existing folder above it, is a file or
    cannot be written; removes the temporary files a killed run left in it. Returns the folder.
    """
    folder = Path(folder).expanduser()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = f"output folder {folder}" + ("" if existing == folder else f": {existing}")
        raise SettingsError(f"{where} is a file; choose a folder (--output-dir) or remove the file")
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise SettingsError(f"cannot write images into {folder} ({existing} is not writable): choose another folder")
    if existing == folder:
        try:  # a real write: read-only file systems, ACLs and quotas show here, not only permissions
            probe = folder / f".write-check.{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SettingsError(f"cannot write images into {folder} ({exc.strerror or exc}): choose another folder") from None
        remove_stale_temp_files(folder)
    return folder


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete hidden `.<name>.<pid>[-<random>].tmp` files in `folder` whose writing process is gone.

    Every temporary file this program writes carries its process id (here and in host/atomic.py), so a
    file of a run that is still going (another process, or this one) is never touched. Returns the removed paths.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        try:
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
        except OSError as exc:
            log.warning("could not remove the stale temporary file %s: %s", path, exc)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", len(removed), folder)
    return removed


_TEMP_NAME = re.compile(r"\..+\.(\d+)(?:-[A-Za-z0-9_]+)?\.tmp")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but is someone else's, or cannot be asked: keep its files
    return True


def save_image(image: Image.Image, folder: Path, name: str, settings: Mapping[str, Any], info: Mapping[str, Any], fmt: str = "png") -> Path:
    """Write atomically (temp file in the same folder, then link/rename) under a name no file has yet."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"  # the pid marks it as this run's (see remove_stale_temp_files)
    try:
        _write(image, tmp, settings, info, fmt)
        return _claim_name(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)


def encode_image(image: Image.Image, settings: Mapping[str, Any], info: Mapping[str, Any], fmt: str = "png") -> bytes:
    """The bytes `save_image` would write (pixels and the embedded settings), for callers that place the file
    themselves (a batch driver writing what its workers encoded)."""
    buffer = io.BytesIO()
    _write(image, buffer, settings, info, fmt)
    return buffer.getvalue()


def _write(image: Image.Image, path: Path | BinaryIO, settings: Mapping[str, Any], info: Mapping[str, Any], fmt: str) -> None:
    text, params = embedded_json(settings, info), parameters_text(settings, info)
    if fmt == "png":
        meta = PngImagePlugin.PngInfo()
        meta.add_text(PARAMETERS_KEY, params)
        meta.add_itxt(SETTINGS_KEY, text)
        meta.add_itxt(WAN2GP_KEY, json.dumps(to_wan2gp(embedded_settings(settings), info), ensure_ascii=False))
        image.save(path, format="PNG", pnginfo=meta)
        return
    exif = Image.Exif()
    exif[IMAGE_DESCRIPTION] = params.encode("ascii", "replace").decode()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = ASCII_PREFIX + text.encode("ascii")
    extra = {"quality": 95} if fmt == "jpeg" else {"lossless": True}
    image.convert("RGB").save(path, format=fmt.upper(), exif=exif.tobytes(), **extra)


def _claim_name(tmp: Path, wanted: Path) -> Path:
    """Hard-link the finished file to the first free name (`x.png`, `x_2.png`, ...): never overwrites."""
    for index in range(1, 10_000):
        final = wanted if index == 1 else wanted.with_name(f"{wanted.stem}_{index}{wanted.suffix}")
        try:
            os.link(tmp, final)  # fails if `final` exists: no race with another writer
            return final
        except FileExistsError:
            continue
        except OSError:  # file systems without hard links
            if not final.exists():
                os.replace(tmp, final)
                return final
    raise OSError(f"no free file name for {wanted}")


def read_settings(path: Path) -> dict[str, Any]:
    """The settings embedded in an image we saved (PNG, JPEG or WebP).

    Only the metadata is read, never the pixels, so a decompression bomb costs nothing; an oversized or
    deeply nested text, or a file that is not an image, is a SettingsError naming the file.
    """
    meta = read_metadata(path)
    text = meta.get(SETTINGS_KEY) or meta.get(USER_COMMENT_KEY)
    if not text:
        raise SettingsError(f"{path}: this image carries no generation settings (was it saved by this program?)")
    return parse_settings_json(text, f"{path}: embedded settings")


def parse_settings_json(text: str, where: str) -> dict[str, Any]:
    """Embedded settings text -> a JSON object; too long, bad or not an object is a SettingsError naming `where`."""
    if len(text) > MAX_EMBEDDED_CHARS:
        raise SettingsError(f"{where} are {len(text):,} characters, more than any image this program saves")
    data = parse_json_text(text, SettingsError, where)
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: not a JSON object")
    return data


def read_metadata(path: Path) -> dict[str, str]:
    """An image's text metadata without decoding its pixels: PNG tEXt/zTXt/iTXt chunks by keyword (and a JPEG
    COM comment as `comment`), the EXIF UserComment and ImageDescription as USER_COMMENT_KEY and
    DESCRIPTION_KEY. A file that is not a readable image, or declares too many pixels, is a SettingsError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # pixels are never decoded here
            with Image.open(path) as image:
                texts = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
                if isinstance(image.info.get(WAN2GP_KEY), bytes):  # a JPEG COM segment
                    texts[WAN2GP_KEY] = image.info[WAN2GP_KEY].decode("utf-8", "replace")
                exif = image.getexif()
                comment = decode_user_comment(exif.get_ifd(EXIF_IFD).get(USER_COMMENT))
                description = exif.get(IMAGE_DESCRIPTION) or exif.get_ifd(EXIF_IFD).get(IMAGE_DESCRIPTION)
    except Image.DecompressionBombError as exc:
        raise SettingsError(f"{path}: refused, the image declares too many pixels to be ours ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as exc:
        # PIL raises ValueError for text chunks that inflate past its limits, SyntaxError for broken chunks
        raise SettingsError(f"{path}: not a readable image ({exc})") from None
    if comment:
        texts[USER_COMMENT_KEY] = comment
    if isinstance(description, bytes):
        description = description.decode("utf-8", "replace")
    if isinstance(description, str) and description.strip("\0 "):
        texts[DESCRIPTION_KEY] = description.rstrip("\0")
    return texts


def decode_user_comment(raw: Any) -> str | None:
    """An EXIF UserComment's text: the 8-byte character code (ASCII, UNICODE = UTF-16, or undefined) then the
    text. UNICODE is read little-endian (what Wan2GP writes), big-endian when a byte-order mark says so."""
    if isinstance(raw, str):
        return raw.rstrip("\0") or None
    if not isinstance(raw, (bytes, bytearray)):
        return None
    raw = bytes(raw)
    if raw.startswith(UNICODE_PREFIX):
        body = raw[len(UNICODE_PREFIX) :]
        encoding = "utf-16-be" if body.startswith(b"\xfe\xff") else "utf-16-le"
        text = body.decode(encoding, "replace").lstrip("\ufeff")
    elif raw.startswith((ASCII_PREFIX, UNDEFINED_PREFIX)):
        text = raw[8:].decode("utf-8", "replace")  # ASCII is a subset; some writers put UTF-8 there
    else:
        text = raw.decode("utf-8", "replace")
    return text.rstrip("\0") or None
