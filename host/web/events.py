"""The web UI's event handlers: what each button and field does. Layout is in host/web/__init__.py.

Handlers return `{component: update}` dicts so each one touches only what it changes. A user's mistake
(a UserInputError: bad settings, missing files, a broken image or LoRA) becomes a message in `#status` or
in the field's note; a generation never runs in a handler (the worker thread runs it), so no spinner waits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from common.errors import UserInputError
from host.lora.sets import list_lsets
from host.outputs import read_settings
from host.session import Session, Task
from host.web.fields import field_updates, page_size_key
from host.web.form import (
    CUSTOM,
    FormField,
    accepted_keys,
    form_fields,
    form_from_settings,
    parse_size,
    preset_defaults,
    resolution_choices,
    resolution_value,
    save_user_defaults,
    settings_for_form,
    settings_from_form,
    settings_from_image,
    snap_size,
)
from host.web.input_preview import InputPreviews, preview_ids
from host.web.lora import LoraPanel
from host.web.models import (
    activity_note,
    count_tokens,
    detected_vram_gb,
    family_of,
    files_report,
    is_out_of_memory,
    lora_files,
    lora_folder,
    memory_plan,
    model_choices,
    models_of_family,
    out_of_memory_advice,
    tokenizer_folder,
)
from host.web.queue import GenerationWorker
from host.web.render import download_bytes, progress_html, queue_html, status_html

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 300  # a status line, not a log


class WebApp(LoraPanel, InputPreviews):
    """One per server: the session, its worker thread, and the handlers the page calls."""

    def __init__(self, session: Session, settings_dir: Path | None):
        self.session = session
        self.settings_dir = settings_dir
        self.worker = GenerationWorker(session, format_error=self.format_error)
        self.choices = model_choices(session)
        self.fields = form_fields(session.registry)  # the form's inputs, from the settings schemas
        self.field_ids = tuple(f.id for f in self.fields)
        self.c: dict[str, Any] = {}
        self.vram_gb = detected_vram_gb()

    # -- facts for the layout -------------------------------------------------------------------

    def fields_of(self, group: str) -> list[FormField]:
        """The form fields of one group of settings (basic, image, advanced, lora), in order."""
        return [f for f in self.fields if f.spec is not None and f.spec.group == group]

    def default_model(self, choices: list[Any]) -> str | None:
        """The first real model (self-test presets come last)."""
        real = [
            c.model_type for c in choices if not self.session.catalog.presets[c.model_type].model_def.get("selftest")
        ]
        return (real or [c.model_type for c in choices] or [None])[0]

    def preset_sizes(self) -> list[str]:
        return sorted(
            {str(p.settings["resolution"]) for p in self.session.catalog.presets.values() if "resolution" in p.settings}
        )

    def model_info(self, model_type: str | None, quantization: str | None) -> str:
        if not model_type:
            return "No model found: add a preset to defaults/ or finetunes/."
        try:
            preset = self.session.catalog.get(model_type)
            quantization = quantization or preset_defaults(self.session, preset, self.settings_dir).get(
                "quantization", "int8"
            )
            report = files_report(self.session, preset, str(quantization))
        except UserInputError as exc:
            return f"**{exc}**"
        description = preset.model_def.get("description", "")
        return f"{description}\n\n{report.text}" if description else report.text

    def format_error(self, task: Task, exc: BaseException) -> str:
        """The worker's message for an unexpected error: out of memory gets the planner's advice."""
        if is_out_of_memory(exc):
            return out_of_memory_advice(task.preset, task.settings)
        return f"{type(exc).__name__}: {exc} (details in the terminal)"

    # -- wiring ---------------------------------------------------------------------------------

    def wire(self, demo: Any, c: dict[str, Any]) -> None:
        """Connect every event; `c` maps element ids to components."""
        self.c = c
        form = [c[f] for f in self.field_ids]
        previews = [c[i] for f in self.fields for i in preview_ids(f.id) if i in c]  # they follow their image's field
        self.apply_outputs = [*form, *self._present("panel_image", "resolution"), *previews, c["family"], c["status"]]
        demo.load(self.on_model_input, [c["model"]], self.apply_outputs, show_progress="hidden")
        c["family"].input(self.on_family, [c["family"]], [c["model"]]).then(
            self.on_model_input, [c["model"]], self.apply_outputs, show_progress="hidden"
        )
        c["model"].input(self.on_model_input, [c["model"]], self.apply_outputs, show_progress="hidden")
        model_outputs = [c["model_info"], c["loras"], c["lset"]]
        c["model"].change(self.on_model_change, [c["model"], c["quantization"]], model_outputs, show_progress="hidden")
        c["quantization"].change(
            self.on_model_change, [c["model"], c["quantization"]], model_outputs, show_progress="hidden"
        )
        self._wire_helpers(c)
        self._wire_run(c, form)
        self._wire_results(c)
        self.wire_input_previews(c, form)
        self._wire_loras(c)

    def _wire_helpers(self, c: dict[str, Any]) -> None:
        """Token count, negative-prompt note, size picker and memory plan; settings a family may not declare
        (no prompt, no guidance, no size) leave theirs unwired."""
        none = gr.State(None)
        if "prompt" in c:
            token_inputs = [c["model"], c["prompt"], c.get("max_tokens", none), c["quantization"]]
            # the status changes when a job ends: the first one may have brought the tokenizer (exact count)
            for name in ("prompt", "max_tokens", "model", "status"):
                if name in c:
                    c[name].change(
                        self.on_tokens, token_inputs, [c["token_count"]], show_progress="hidden", trigger_mode="always_last"
                    )
        for target, sources in self._activity_sources().items():  # the negative prompt follows guidance and NAG
            inputs = [c[f.id] for f in sources]
            for source in inputs:
                source.change(self._activity_handler(target, sources), inputs, [c[target]], show_progress="hidden")
        if "width" in c:
            size = [c["width"], c["height"]]
            c["resolution"].input(self.on_resolution, [c["resolution"]], size, show_progress="hidden")
            for name in ("width", "height"):
                c[name].change(self.on_size, size, [c["size_note"], c["resolution"]], show_progress="hidden")
            plan_inputs = [c["model"], *size, c.get("guidance", none)]
            for name in self._names_present("model", "width", "height", "guidance"):
                c[name].change(self.on_memory, plan_inputs, [c["memory_plan"]], show_progress="hidden")

    def _wire_run(self, c: dict[str, Any], form: list[Any]) -> None:
        # Handlers that concern "my jobs" take a gr.Request (Gradio passes it): its session hash names the tab.
        size_outputs = self._present("width", "height", "size_note")
        c["generate"].click(self.on_generate_in_tab, form, [c["status"], *size_outputs], show_progress="hidden")
        c["abort"].click(self.on_abort, None, [c["status"]], show_progress="hidden")
        c["clear_queue"].click(self.on_clear, None, [c["status"]], show_progress="hidden")
        c["save_defaults"].click(self.on_save_defaults, form, [c["status"]], show_progress="hidden")
        if "reuse_seed" in c:
            c["reuse_seed"].click(self.on_reuse_seed, [c["selected"]], [c["seed"], c["status"]], show_progress="hidden")
        tick_outputs = [c["progress"], c["preview"], c["gallery"], c["status"], c["queue"], c["page"]]
        c["timer"].tick(self.on_tick, [c["page"]], tick_outputs, show_progress="hidden", concurrency_limit=None)

    def _wire_results(self, c: dict[str, Any]) -> None:
        c["gallery"].select(self.on_select, [c["page"]], [c["image_settings"], c["selected"]], show_progress="hidden")
        c["use_settings"].click(
            self.on_use_settings, [c["selected"], c["model"]], self.apply_outputs, show_progress="hidden"
        )
        drop_outputs = [*self.apply_outputs, c["settings_drop"]]  # the drop area is emptied for the next image
        c["settings_drop"].upload(self.on_drop, [c["settings_drop"], c["model"]], drop_outputs, show_progress="hidden")

    # -- model and form -------------------------------------------------------------------------

    def on_family(self, family: str) -> Any:
        models = models_of_family(self.choices, family)
        return gr.update(choices=models, value=models[0][1] if models else None)

    def on_model_input(self, model_type: str | None) -> dict[Any, Any]:
        """A model was chosen: its defaults (preset < the user's saved defaults) fill the form."""
        if not model_type:
            return {}
        try:
            preset = self.session.catalog.get(model_type)
        except UserInputError as exc:
            return {self.c["status"]: status_html(str(exc), "error")}
        return self.apply(preset_defaults(self.session, preset, self.settings_dir), model_type)

    def apply(self, settings: dict[str, Any], current_model: str | None, note: str = "") -> dict[Any, Any]:
        """Put settings into the form (fields the settings do not mention keep their values)."""
        c, catalog = self.c, self.session.catalog.presets
        wanted = settings.get("model_type")
        model_type = wanted if wanted in catalog else current_model
        if wanted and wanted not in catalog:
            note += f" The model type {wanted!r} is not available here; kept {current_model!r}."
        values = form_from_settings({k: v for k, v in settings.items() if k != "model_type"}, self.fields)
        updates = self._field_updates(values, model_type)
        if model_type:
            family = family_of(self.choices, model_type)
            updates[c["family"]] = family
            updates[c["model"]] = gr.update(
                value=model_type, choices=models_of_family(self.choices, family) if family else []
            )
            files = lora_files(self.session, catalog[model_type])
            lora_update = {"choices": files} | ({"value": values["loras"]} if "loras" in values else {})
            updates[c["loras"]] = updates.get(c["loras"], {}) | gr.update(**lora_update)
        for target, sources in self._activity_sources().items():  # notes that follow other settings' values
            if any(f.id in values for f in sources):
                known = {f.key: values[f.id] for f in sources if f.id in values}
                updates[c[target]] = updates.get(c[target], {}) | self.on_activity(target, known)
        if "width" in values:
            shown = resolution_value(values["width"], values["height"], self._resolutions())
            updates[c["resolution"]] = updates.get(c["resolution"], {}) | gr.update(value=shown)
        if note.strip():
            updates[c["status"]] = status_html(note.strip(), "info")
        return updates

    def _field_updates(self, values: dict[str, Any], model_type: str | None) -> dict[Any, Any]:
        """New values, and only the fields of settings the model type accepts shown."""
        preset = self.session.catalog.presets.get(model_type or "")
        accepted = accepted_keys(self.session, preset) if preset is not None else {f.key for f in self.fields}
        return field_updates(gr, self.c, self.fields, values, accepted)

    def _present(self, *names: str) -> list[Any]:
        return [self.c[name] for name in self._names_present(*names)]

    def _names_present(self, *names: str) -> list[str]:
        return [name for name in names if name in self.c]

    def _resolutions(self) -> list[tuple[str, str]]:
        return resolution_choices(self.preset_sizes())

    def on_model_change(self, model_type: str | None, quantization: str | None) -> tuple[Any, Any, Any]:
        info = self.model_info(model_type, quantization)
        if not model_type or model_type not in self.session.catalog.presets:
            return info, gr.update(), gr.update()
        preset = self.session.catalog.presets[model_type]
        folder = lora_folder(self.session, preset)
        return info, gr.update(choices=lora_files(self.session, preset)), gr.update(choices=list_lsets(folder))

    def on_tokens(
        self, model_type: str | None, prompt: str | None, max_tokens: float | None, quantization: str | None
    ) -> str:
        preset = self.session.catalog.presets.get(model_type or "")
        if preset is None:
            return ""
        folder = tokenizer_folder(self.session, preset, quantization or "int8")
        return count_tokens(prompt or "", folder, int(max_tokens or 512)).markdown()

    def _activity_sources(self) -> dict[str, list[FormField]]:
        """Field id -> the fields it follows, for settings that act only through others (their spec's
        `active_when`, declared by the family: the negative prompt acts through guidance or NAG)."""
        by_key: dict[str, FormField] = {}
        for f in self.fields:
            if f.spec is not None and f.id in self.c:
                by_key.setdefault(f.key, f)
        found = {}
        for f in self.fields:
            if f.spec is not None and f.spec.active_when and f.id in self.c:
                sources = [by_key[name] for name, _ in f.spec.active_when if name in by_key]
                if sources:
                    found[f.id] = sources
        return found

    def _activity_handler(self, target: str, sources: list[FormField]) -> Callable[..., Any]:
        def handler(*values: Any) -> Any:
            return self.on_activity(target, {f.key: v for f, v in zip(sources, values, strict=True)})

        return handler

    def on_activity(self, target: str, values: Mapping[str, Any]) -> Any:
        """The label and look of field `target` for these values of the settings it follows (by name)."""
        spec = next(f.spec for f in self.fields if f.id == target)
        active, label = activity_note(spec, values)
        return gr.update(label=label, elem_classes=[] if active else ["wgp-inactive"])

    def on_resolution(self, resolution: str | None) -> tuple[Any, Any]:
        if not resolution or resolution == CUSTOM:
            return gr.update(), gr.update()
        try:
            width, height = parse_size(resolution)
        except UserInputError:
            return gr.update(), gr.update()
        return width, height

    def on_size(self, width: float | None, height: float | None) -> tuple[str, Any]:
        if width is None or height is None:
            return "", gr.update()
        w, h, note = snap_size(width, height)
        text = f"Custom size: will be {note}." if note else ""
        return text, resolution_value(int(width), int(height), self._resolutions())

    def on_memory(
        self, model_type: str | None, width: float | None, height: float | None, guidance: float | None
    ) -> str:
        preset = self.session.catalog.presets.get(model_type or "")
        if preset is None or not width or not height:
            return ""
        settings = {"resolution": f"{int(width)}x{int(height)}", "guidance_scale": guidance or 0}
        return memory_plan(preset, settings, self.vram_gb) or "(no memory plan for this model)"

    # -- running --------------------------------------------------------------------------------

    def on_generate_in_tab(self, request: gr.Request, *values: Any) -> dict[Any, Any]:
        """Generate pressed in a browser tab: the job belongs to that tab."""
        return self.on_generate(*values, owner=tab_of(request))

    def on_generate(self, *values: Any, owner: str = "") -> dict[Any, Any]:
        """Validate the form now (errors shown at once), then queue it as a job with its own settings."""
        c, form = self.c, dict(zip(self.field_ids, values, strict=True))
        if not form.get("model"):
            return {c["status"]: status_html("Choose a model first.", "error")}
        try:
            preset = self.session.catalog.get(form["model"])
            result = settings_from_form(form, self.fields, accepted_keys(self.session, preset))
            task = self.session.prepare({**result.settings, "model_type": preset.model_type}, "web UI")
        except UserInputError as exc:
            return {c["status"]: status_html(f"Not queued: {exc}", "error")}
        # The status line of a queued job comes from the page's poll (`on_tick`), starting with the worker's
        # "Queued job #N" event: written here as well, it could land after the poll had shown the job's end.
        self.worker.submit(task, owner, result.notes)
        updates: dict[Any, Any] = {}
        size_key = page_size_key(self.fields)
        if result.notes and size_key in task.settings:
            updates[c["width"]], updates[c["height"]] = parse_size(str(task.settings[size_key]))
            updates[c["size_note"]] = result.notes[0]
        return updates

    def on_abort(self, request: gr.Request | None = None) -> str:
        return status_html(self.worker.abort(tab_of(request)), "info")

    def on_clear(self, request: gr.Request | None = None) -> str:
        removed = self.worker.clear(tab_of(request))
        return status_html(f"Removed {removed} of your waiting job(s) from the queue.", "info")

    def on_save_defaults(self, *values: Any) -> str:
        form = dict(zip(self.field_ids, values, strict=True))
        if self.settings_dir is None or not form.get("model"):
            return status_html("Choose a model first.", "error")
        try:
            preset = self.session.catalog.get(form["model"])
            result = settings_from_form(form, self.fields, accepted_keys(self.session, preset))
            self.session.prepare({**result.settings, "model_type": preset.model_type}, "defaults")
            path = save_user_defaults(self.settings_dir, preset.model_type, result.settings)
        except (UserInputError, OSError) as exc:
            return status_html(f"Defaults not saved: {exc}", "error")
        return status_html(f"Saved as your defaults for {preset.model_type}: {path}", "success")

    def on_reuse_seed(self, selected: str | None, request: gr.Request | None = None) -> tuple[Any, str]:
        seed = None
        if selected:
            seed = self._read(Path(selected)).get("seed")
        if seed is None:
            done = [j for j in self.worker.snapshot().finished if j.settings and j.owner == tab_of(request)]
            seed = done[-1].settings.get("seed") if done else None
        if seed is None:
            return gr.update(), status_html("No image yet: generate one (or pick one in the gallery) first.", "info")
        return seed, status_html(f"Seed {seed} reused.", "info")

    def on_tick(self, page: dict[str, Any] | None, request: gr.Request | None = None) -> dict[Any, Any]:
        """Poll the worker: progress, preview, new gallery images and the latest event, only what changed.

        Status, gallery and preview are this tab's own jobs' (another tab's job is never shown as its
        own); the queue table lists every tab's jobs, marked.
        """
        c, snap, page, owner = self.c, self.worker.snapshot(), dict(page or {}), tab_of(request)
        event = snap.event_of(owner)
        if "start" not in page:  # the gallery and the status show what happened since the page opened
            page["start"], page["event_v"] = len(snap.results), event.version if event else None
        updates: dict[Any, Any] = {}
        downloading = (
            download_bytes(self.session.folders.primary)
            if snap.current and snap.current.state == "checking files" and snap.current.owner == owner
            else 0
        )
        for key, html_text in (
            ("progress", progress_html(snap, downloading, owner)),
            ("queue", queue_html(snap, owner)),
        ):
            if page.get(key) != html_text:
                updates[c[key]] = page[key] = html_text
        items = [i for i in reversed(snap.results[page["start"] :]) if i.owner == owner]
        if len(items) != page.get("gallery_n"):
            page["gallery_n"], page["paths"] = len(items), [str(i.path) for i in items]
            updates[c["gallery"]] = [(str(i.path), i.caption) for i in items]
        own_preview = snap.preview is not None and snap.preview_owner == owner
        if own_preview and snap.preview_version != page.get("preview_v"):
            page["preview_v"], updates[c["preview"]] = snap.preview_version, snap.preview
        if event is not None and event.version != page.get("event_v"):
            page["event_v"], updates[c["status"]] = event.version, status_html(event.text, event.level)
        updates[c["page"]] = page
        return updates

    # -- results --------------------------------------------------------------------------------

    def on_select(self, page: dict[str, Any] | None, evt: gr.SelectData) -> tuple[str, str | None]:
        paths = (page or {}).get("paths", [])
        if evt.index is None or not 0 <= int(evt.index) < len(paths):
            return "", None
        path = paths[int(evt.index)]
        return json.dumps(self._read(Path(path)), indent=2), path

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            return read_settings(path)
        except UserInputError as exc:
            return {"error": str(exc)}

    def on_use_settings(self, selected: str | None, model_type: str | None) -> dict[Any, Any]:
        if not selected:
            return {self.c["status"]: status_html("Select an image in the gallery first.", "info")}
        return self._apply_image(Path(selected), model_type)

    def on_drop(self, file: Any, model_type: str | None) -> dict[Any, Any]:
        """A dropped file: its settings fill the form, or one line says why not. The drop area is emptied
        either way, ready for the next file."""
        path = getattr(file, "name", file)
        if not path:
            return {}
        path = Path(str(path))
        try:
            updates = self._apply_image(path, model_type)
        except Exception:  # noqa: BLE001 - whatever a dropped file does, the page gets one line, not a trace
            log.warning("reading settings from a dropped file failed", exc_info=True)
            text = f"No settings taken from {path.name}: it is not an image this program can read."
            updates = {self.c["status"]: status_html(text, "error")}
        return updates | {self.c["settings_drop"]: None}

    def _apply_image(self, path: Path, model_type: str | None) -> dict[Any, Any]:
        try:
            found = settings_from_image(path)
        except UserInputError as exc:  # one line, naming the file, not the server's temporary folder
            text = " ".join(str(exc).replace(str(path), path.name).split())
            text = text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"
            return {self.c["status"]: status_html(f"No settings taken: {text}", "error")}
        settings, notes = settings_for_form(self.session, found, model_type)
        message = " ".join([f"Settings taken from {path.name} ({found.source}).", *(f"{n}." for n in notes)])
        return self.apply(settings, model_type, message)


def tab_of(request: Any) -> str:
    """The browser tab a request comes from (Gradio's session hash; "" without a request, e.g. in scripts)."""
    return str(getattr(request, "session_hash", None) or "")
