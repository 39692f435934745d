"""The generation form's inputs, built from the settings schemas (host/web/form.py `form_fields`).

Each setting's kind picks its component: text -> a text box (a dropdown of suggestions where the spec lists
some), int/float -> a number box with the spec's bounds, bool -> a checkbox, choice -> a dropdown, size -> the
resolution picker with width and height, image -> an image upload, list -> a multi-select. Small inputs
share rows. A family's new setting appears here without any change to this file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from host.settings import HOST_ONLY
from host.web.form import FormField, resolution_choices
from host.web.input_preview import preview_ids, preview_inputs

SMALL_KINDS = {"int", "float", "bool", "choice"}  # share a row with their neighbours
IMAGE_HEIGHT = 220


def field_rows(gr: Any, c: dict[str, Any], fields: Sequence[FormField], app: Any, per_row: int = 3) -> None:
    """The inputs of `fields` in order: small ones `per_row` to a row (a new row where the host's settings
    start), the others on their own; each component is stored in `c` under its field id."""
    row: list[FormField] = []

    def flush() -> None:
        if row:
            with gr.Row():
                for f in row:
                    _input(gr, c, f)
            row.clear()

    for field in fields:
        spec = field.spec
        assert spec is not None, "the model picker is not a settings field"
        if row and (field.key in HOST_ONLY) != (row[-1].key in HOST_ONLY):
            flush()
        if spec.kind == "size":
            if field.id == _first_side(fields, field.key):
                flush()
                _size_inputs(gr, c, fields, field, app)
        elif spec.kind in SMALL_KINDS or (spec.kind == "text" and spec.choices):
            row.append(field)
            if len(row) == per_row:
                flush()
        else:
            flush()
            _input(gr, c, field)
    flush()


def _input(gr: Any, c: dict[str, Any], field: FormField) -> None:
    spec, fid = field.spec, field.id
    assert spec is not None
    common = {"label": spec.title, "elem_id": fid}
    if spec.kind == "text" and spec.choices:
        c[fid] = gr.Dropdown(list(spec.choices), allow_custom_value=True, **common)
    elif spec.kind == "text":
        c[fid] = gr.Textbox(lines=spec.lines, **common)
        if fid == "prompt":  # the token counter sits under the prompt (host/web/events.py on_tokens)
            c["token_count"] = gr.Markdown("", elem_id="token_count")
    elif spec.kind in ("int", "float"):
        bounds = {"minimum": spec.minimum, "maximum": spec.maximum}
        numbers = {"precision": 0} if spec.kind == "int" else {"step": spec.step or 0.1}
        c[fid] = gr.Number(**numbers, **bounds, scale=2 if fid == "seed" else None, **common)
        if fid == "seed":  # reuse the seed of the image picked in the gallery (or of the last job)
            c["reuse_seed"] = gr.Button("♻ last seed", elem_id="reuse_seed", scale=1, size="sm")
    elif spec.kind == "bool":
        c[fid] = gr.Checkbox(info=spec.help, **common)
    elif spec.kind == "choice":
        texts = [str(choice) for choice in spec.choices]
        c[fid] = gr.Dropdown(texts, allow_custom_value=not all(isinstance(x, str) for x in spec.choices), **common)
    elif spec.kind == "image" and spec.preview:  # the upload and, beside it, what the model will read
        with gr.Row():
            _image_upload(gr, c, fid, common)
            preview_inputs(gr, c, fid, spec.title, IMAGE_HEIGHT)
    elif spec.kind == "image":
        _image_upload(gr, c, fid, common)
    elif spec.kind == "list":
        c[fid] = gr.Dropdown([], multiselect=True, allow_custom_value=True, scale=4, **common)
    else:  # text_or_list
        c[fid] = gr.Textbox(info=spec.help, **common)


def _image_upload(gr: Any, c: dict[str, Any], fid: str, common: dict[str, Any]) -> None:
    # filepath without a mode: the uploaded file itself reaches the task (its sha256 is the file's)
    c[fid] = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], height=IMAGE_HEIGHT, **common)


def _size_inputs(gr: Any, c: dict[str, Any], fields: Sequence[FormField], field: FormField, app: Any) -> None:
    """The page's size (`width`/`height`): a resolution picker, the two sides and a note; another size: its sides."""
    width, height = (f for f in fields if f.key == field.key)
    with gr.Row():
        if width.id == "width":
            c["resolution"] = gr.Dropdown(
                resolution_choices(app.preset_sizes()),
                label=field.spec.title if field.spec else "Resolution",
                elem_id="resolution",
                allow_custom_value=True,
                scale=2,
            )
        for side in (width, height):
            c[side.id] = gr.Number(label=side.id.replace("_", " ").capitalize(), precision=0, elem_id=side.id, scale=1)
    if width.id == "width":
        c["size_note"] = gr.Markdown("", elem_id="size_note")


def _first_side(fields: Sequence[FormField], key: str) -> str:
    return next(f.id for f in fields if f.key == key)


def field_updates(
    gr: Any, c: dict[str, Any], fields: Sequence[FormField], values: Mapping[str, Any], accepted: set[str]
) -> dict[Any, Any]:
    """Gradio updates: each field's new value (where `values` has one), shown only when the model type
    accepts its setting; the resolution picker with the page's size, the image panel with its fields."""
    updates: dict[Any, Any] = {}
    for field in fields:
        if field.spec is not None:  # not the model picker
            value = {"value": values[field.id]} if field.id in values else {}
            updates[c[field.id]] = gr.update(visible=field.key in accepted, **value)
            for part in preview_ids(field.id):  # an image's preview follows its upload
                if part in c:
                    updates[c[part]] = gr.update(visible=field.key in accepted)
    if "panel_image" in c:
        images = [f for f in fields if f.spec is not None and f.spec.kind == "image"]
        updates[c["panel_image"]] = gr.update(visible=any(f.key in accepted for f in images))
    if "resolution" in c:
        updates[c["resolution"]] = gr.update(visible=page_size_key(fields) in accepted)
    return updates


def page_size_key(fields: Sequence[FormField]) -> str | None:
    """The setting behind the page's width/height fields (`resolution`), if any family has a size."""
    return next((f.key for f in fields if f.id == "width"), None)
