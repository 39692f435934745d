"""The web UI (Gradio): `python wgp.py` serves it on http://127.0.0.1:7860.

The page is up before any model loads; the first generation checks and downloads the files and loads
the model, with its own progress. Tasks go to a queue (host/web/queue.py) run by one worker thread with
the same session calls as the CLI (prepare -> run -> save), so images are saved exactly as the CLI saves
them. The page polls the worker twice a second. Layout here; form logic in web_form.py, model facts in
web_models.py, HTML in web_render.py; the handlers live in web_events.py.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from host import PROGRAM_NAME, __version__
from host.session import HostConfig, Session
from host.web.fields import field_rows
from host.web.form import DEFAULT_SETTINGS_DIR
from host.web.models import family_choices, family_of, model_choices, models_of_family

DEFAULT_PORT = 7860
POLL_S = 0.5
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


def launch(args: argparse.Namespace) -> int:
    """Serve the web UI until Ctrl-C (called by `python wgp.py` with the parsed CLI flags)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home
    session = Session(HostConfig.from_args(args))
    settings_dir = getattr(args, "settings_dir", None) or DEFAULT_SETTINGS_DIR
    demo = build_app(session, Path(settings_dir))
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen:
        print(
            "WARNING: --listen serves the web UI on every network interface, without a password: anyone who can "
            "reach this machine can generate images and read the output folder."
        )
    port = args.server_port or DEFAULT_PORT
    shown = host if args.listen else "127.0.0.1"
    print(f"{PROGRAM_NAME} {__version__}: web UI on http://{shown}:{port} (Ctrl-C to stop)")
    serve(demo, session, host, port, share=bool(args.share))
    return 0


def serve(demo: Any, session: Session, host: str, port: int, share: bool = False, block: bool = True) -> None:
    """Start the server (no analytics, no server-side rendering, no share link unless asked)."""
    import gradio as gr

    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)  # system fonts: no font download
    from host.web.render import CSS

    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=False,
        prevent_thread_lock=not block,
        show_error=True,
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        allowed_paths=[str(session.config.output_dir)],
        theme=theme,
        css=CSS,
        footer_links=[],
    )


def build_app(session: Session, settings_dir: Path | None = DEFAULT_SETTINGS_DIR) -> Any:
    """The Blocks app; nothing is loaded (presets are read, no model files are touched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from host.web.events import WebApp

    app = WebApp(session, settings_dir)
    with gr.Blocks(title=PROGRAM_NAME, analytics_enabled=False) as demo:
        gr.Markdown(f"## {PROGRAM_NAME} {__version__} · local image generation")
        c: dict[str, Any] = {}
        with gr.Row():
            with gr.Column(scale=5):
                _model_panel(gr, c, app)
                field_rows(gr, c, app.fields_of("basic"), app)
                _image_panel(gr, c, app)
                _buttons(gr, c)
                _advanced_panel(gr, c, app)
                _lora_panel(gr, c, app)
            with gr.Column(scale=6):
                _results_panel(gr, c)
        c["page"] = gr.State({})
        c["selected"] = gr.State(None)
        c["timer"] = gr.Timer(POLL_S)
        app.wire(demo, c)
    return demo


def _model_panel(gr: Any, c: dict[str, Any], app: Any) -> None:
    choices = model_choices(app.session)
    default = app.default_model(choices)
    family = family_of(choices, default) if default else None
    with gr.Row():
        c["family"] = gr.Dropdown(family_choices(choices), value=family, label="Family", elem_id="family", scale=1)
        c["model"] = gr.Dropdown(
            models_of_family(choices, family) if family else [],
            value=default,
            label="Model",
            elem_id="model",
            scale=3,
            allow_custom_value=False,  # typed text that is not a model is not taken
        )
    c["model_info"] = gr.Markdown(app.model_info(default, None), elem_id="model_info")


def _image_panel(gr: Any, c: dict[str, Any], app: Any) -> None:
    """Image inputs (a family's start image, mask, ...): shown for the model types that take them."""
    fields = app.fields_of("image")
    if fields:
        with gr.Accordion("Image inputs", open=True, elem_id="image_inputs") as c["panel_image"]:
            field_rows(gr, c, fields, app)


def _advanced_panel(gr: Any, c: dict[str, Any], app: Any) -> None:
    with gr.Accordion("Advanced options", open=False):
        field_rows(gr, c, app.fields_of("advanced"), app, per_row=4)
        c["memory_plan"] = gr.Code(
            label="Memory planner (expected peaks)", language=None, elem_id="memory_plan", lines=4
        )


def _lora_panel(gr: Any, c: dict[str, Any], app: Any) -> None:
    with gr.Accordion("LoRAs", open=True):
        for field in app.fields_of("lora"):
            if field.spec.kind == "list":  # the LoRA files of the family folder, with a refresh button
                with gr.Row():
                    field_rows(gr, c, [field], app)
                    c["lora_refresh"] = gr.Button("⟳ refresh", elem_id="lora_refresh", size="sm", scale=1)
            else:
                field_rows(gr, c, [field], app)
        with gr.Row():
            c["lset"] = gr.Dropdown([], label="LoRA set (.lset)", elem_id="lset", allow_custom_value=True, scale=2)
            c["lset_load"] = gr.Button("load set", elem_id="lset_load", size="sm", scale=1)
            c["lset_name"] = gr.Textbox(label="save as", elem_id="lset_name", scale=2)
            c["lset_save"] = gr.Button("save set", elem_id="lset_save", size="sm", scale=1)
        c["lora_report"] = gr.Markdown("", elem_id="lora_report")


def _buttons(gr: Any, c: dict[str, Any]) -> None:
    with gr.Row():
        c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
        c["abort"] = gr.Button("Abort", variant="stop", elem_id="abort", scale=1)
        c["clear_queue"] = gr.Button("Clear queue", elem_id="clear_queue", scale=1)
    c["save_defaults"] = gr.Button("Save as my defaults for this model", elem_id="save_defaults", size="sm")


def _results_panel(gr: Any, c: dict[str, Any]) -> None:
    c["status"] = gr.HTML("", elem_id="status")
    c["progress"] = gr.HTML("", elem_id="progress")
    with gr.Row():
        c["preview"] = gr.Image(
            label="Live preview (latents)", elem_id="preview", type="pil", interactive=False, height=300, scale=2
        )
        c["gallery"] = gr.Gallery(
            label="Images since this page opened (click one for its settings)",
            elem_id="gallery",
            columns=3,
            height=300,
            interactive=False,
            preview=False,
            object_fit="contain",
            scale=3,
        )
    c["queue"] = gr.HTML("", elem_id="queue")
    c["image_settings"] = gr.Code(
        label="Settings of the selected image", language="json", elem_id="image_settings", lines=4, max_lines=12
    )
    with gr.Row():
        c["use_settings"] = gr.Button("Use these settings", elem_id="use_settings", scale=1)
        # No file_types: Gradio would refuse other files before the handler runs, leaving the area on "Error";
        # the handler reads any file and answers in one line (host/web/events.py on_drop).
        c["settings_drop"] = gr.File(
            label="Drop a PNG/JPEG/WebP to use its settings",
            elem_id="settings_drop",
            height=90,
            scale=2,
        )


__all__ = ["build_app", "launch", "serve"]
