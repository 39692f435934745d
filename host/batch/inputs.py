"""Batch inputs: the rows of a JSON, JSONL or CSV file, with `--set KEY=VALUE` defaults and a prompt template.

A row is a settings dict and where it came from (its line number, or its item number in a JSON list).
Nothing is validated against a model here: rows that cannot even be read (bad JSON on a line, a CSV
row with more values than the header, a template column that is missing) carry their error; the
others are validated by `host/batch/plan.py`, before any model loads.
"""

from __future__ import annotations

import csv
import json
import logging
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import SettingsError

log = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".csv")
MAX_ROW_CHARS = 1_000_000  # a JSONL line or CSV field larger than this is not a task (csv refuses above its own limit)


@dataclass
class Row:
    """One task as read: its settings (before validation) and where it came from."""

    number: int  # 1-based: the line of a JSONL row or of a CSV record's start; a JSON list's item number
    where: str  # "rows.csv line 7", for messages
    settings: dict[str, Any] = field(default_factory=dict)
    text_keys: frozenset[str] = frozenset()  # values given as text (CSV cells, --set): typed by the model's schema
    error: str | None = None


@dataclass(frozen=True)
class Template:
    """A prompt template such as `studio photo of {product}, {style}`: each `{name}` is a column of the row."""

    text: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        """Check the placeholders once (named, no format specs); SettingsError says what is wrong."""
        fields: list[str] = []
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise SettingsError(f"--template {text!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
        for _, name, spec, conversion in parts:
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise SettingsError(f"--template: placeholders are column names like {{product}}, got {{{name}{spec and ':' + spec}}}")
            if name not in fields:
                fields.append(name)
        return cls(text, tuple(fields))

    def fill(self, values: Mapping[str, Any]) -> str:
        """The prompt for one row; SettingsError names the missing columns."""
        missing = [f for f in self.fields if values.get(f) in (None, "")]
        if missing:
            raise SettingsError(f"the template needs the column(s) {', '.join(missing)}, which this row leaves empty or lacks")
        return self.text.format_map({f: values[f] for f in self.fields})


def parse_set_options(items: Sequence[str]) -> dict[str, str]:
    """`--set KEY=VALUE` (repeatable) -> {key: text}; the values are typed later by the model's schema."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set {item!r}: write KEY=VALUE, e.g. --set num_inference_steps=8")
        out[key.strip()] = value
    return out


def read_rows(path: Path, defaults: Mapping[str, Any] | None = None, template: Template | None = None,
              text_defaults: Iterable[str] = ()) -> list[Row]:
    """Every row of a .json, .jsonl or .csv file, `defaults` under each row and the template filled.

    `text_defaults` names the defaults given as text (from --set). A file that cannot be read at all is a
    SettingsError naming it; a bad row is a Row with its error and the others are still returned.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SettingsError(f"{path}: a batch file is .json, .jsonl or .csv (got {suffix or 'no suffix'})")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet programs write a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read this batch file ({exc})") from None
    reader = {".json": _json_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows}[suffix]
    rows = reader(path, text)
    if template is not None and suffix == ".csv" and rows:
        _check_template_columns(path, text, template, set(defaults or {}))
    for row in rows:
        if row.error is None:
            _finish_row(row, defaults or {}, template, frozenset(text_defaults))
    return rows


def _finish_row(row: Row, defaults: Mapping[str, Any], template: Template | None, text_defaults: frozenset[str]) -> None:
    """Defaults under the row, then the template's prompt (its placeholder columns stay, `plan` drops them)."""
    own = row.settings
    row.settings = {**defaults, **own}
    row.text_keys = row.text_keys | {k for k in text_defaults if k not in own}
    if template is not None:
        try:
            row.settings["prompt"] = template.fill(row.settings)
        except SettingsError as exc:
            row.error = f"{row.where}: {exc}"
            return
        row.text_keys = row.text_keys - {"prompt"}


def _json_rows(path: Path, text: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise SettingsError(f"{path}: a JSON batch file holds a settings object or a list of them, not {type(data).__name__}")
    return [_object_row(item, i, f"{path.name} item {i}") for i, item in enumerate(items, 1)]


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON text may hold U+2028 and friends
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        if len(line) > MAX_ROW_CHARS:
            rows.append(Row(number, where, error=f"{where}: {len(line):,} characters, more than any task needs"))
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(Row(number, where, error=f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); one object per line"))
            continue
        rows.append(_object_row(item, number, where))
    return rows


def _object_row(item: Any, number: int, where: str) -> Row:
    if not isinstance(item, dict):
        return Row(number, where, error=f"{where}: a task is a JSON object of settings, got {type(item).__name__}")
    return Row(number, where, dict(item))


def _csv_rows(path: Path, text: str) -> list[Row]:
    """A header row of setting (or template column) names, then one task per record; empty cells are not given."""
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise SettingsError(f"{path}: cannot read the CSV header ({exc})") from None
    header = [name.strip() for name in header or []]
    if not header or not any(header):
        raise SettingsError(f"{path}: the first line must name the columns, e.g. prompt,seed")
    duplicates = sorted({n for n in header if header.count(n) > 1})
    if duplicates or "" in header:
        what = f"repeats {', '.join(duplicates)}" if duplicates else "has an empty column name"
        raise SettingsError(f"{path}: the header {what}; give every column one unique name")
    rows = []
    while True:
        start = reader.line_num + 1  # the record's first line (a quoted cell may span lines)
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append(Row(start, f"{path.name} line {start}", error=f"{path.name} line {start}: {exc}"))
            continue
        if not any(c.strip() for c in cells):
            continue
        rows.append(_csv_row(path, start, header, cells))
    return rows


def _csv_row(path: Path, number: int, header: list[str], cells: list[str]) -> Row:
    where = f"{path.name} line {number}"
    if len(cells) > len(header):
        message = f"{len(cells)} values but the header names {len(header)} columns (quote cells holding commas)"
        return Row(number, where, error=f"{where}: {message}")
    settings = {name: value for name, value in zip(header, cells, strict=False) if value != ""}
    return Row(number, where, settings, text_keys=frozenset(settings))


def _check_template_columns(path: Path, text: str, template: Template, defaults: set[str]) -> None:
    """A placeholder that neither a column nor a --set default provides fails the whole file once (not once per row)."""
    header = {name.strip() for name in next(csv.reader(text.splitlines()), [])}
    missing = [f for f in template.fields if f not in header | defaults]
    if missing:
        raise SettingsError(f"--template uses {', '.join('{' + m + '}' for m in missing)} but {path} has no such column "
                            f"(columns: {', '.join(sorted(header))})")
