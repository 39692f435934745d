"""Previews of image inputs: an image setting whose spec says `preview` (a ControlNet's control image) gets a
button beside its upload; pressing it shows the image as the model will read it (the family's
`preview_input`, e.g. Canny edges of the uploaded picture at the chosen size), before anything is generated.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from common.errors import UserInputError
from host import settings as host_settings
from host.web.form import accepted_keys, settings_from_form
from host.web.render import status_html

log = logging.getLogger(__name__)


def preview_ids(fid: str) -> tuple[str, str]:
    """The ids of an image field's preview button and preview image."""
    return f"{fid}_preview_button", f"{fid}_preview"


def preview_inputs(gr: Any, c: dict[str, Any], fid: str, title: str, height: int) -> None:
    """The button and the (read-only) image beside an image upload; stored in `c` under `preview_ids(fid)`."""
    button, image = preview_ids(fid)
    with gr.Column():
        c[image] = gr.Image(label=f"{title}: as the model reads it", elem_id=image, type="pil", interactive=False, height=height)
        c[button] = gr.Button("Preview", elem_id=button, size="sm")


class InputPreviews:
    """WebApp's part for the previews (needs `session`, `fields`, `field_ids` and `c`)."""

    session: Any
    fields: list[Any]
    field_ids: tuple[str, ...]
    c: dict[str, Any]

    def wire_input_previews(self, c: dict[str, Any], form: list[Any]) -> None:
        """Each preview button reads the whole form (the picture, how to turn it into the control image, the size)."""
        for field in self.fields:
            button, image = preview_ids(field.id)
            if field.spec is not None and field.spec.preview and button in c:
                handler = functools.partial(self.on_input_preview, field.key, field.id)
                c[button].click(handler, form, [c[image], c["status"]], show_progress="hidden")

    def on_input_preview(self, key: str, fid: str, *values: Any) -> dict[Any, Any]:
        """The family's image for setting `key` from the form's values, or one line saying why not."""
        c, form = self.c, dict(zip(self.field_ids, values, strict=True))
        image_out = c[preview_ids(fid)[1]]
        try:
            if not form.get("model"):
                raise UserInputError("choose a model first")
            preset = self.session.catalog.get(form["model"])
            result = settings_from_form(form, self.fields, accepted_keys(self.session, preset))
            task = self.session.prepare({**result.settings, "model_type": preset.model_type}, "preview")
            handler = self.session.handler(task.preset)
            preview = getattr(handler, "preview_input", None)
            if preview is None:
                raise UserInputError(f"the family of {preset.model_type} shows no preview of {key}")
            specs = host_settings.family_specs(handler, task.preset.architecture)
            image = preview(task.preset.architecture, key, host_settings.generation_inputs(specs, task.settings))
        except UserInputError as exc:
            return {image_out: None, c["status"]: status_html(f"No preview: {exc}", "error")}
        width, height = image.size
        return {image_out: image, c["status"]: status_html(f"Preview of {key}: {width}x{height}, as the model reads it.", "info")}
