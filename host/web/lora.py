"""The web UI's LoRA panel: the family folder's files, load reports, multipliers and `.lset` sets.

A mixin of host/web/events.py's WebApp (it uses `self.session` and `self.c`).
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from common.errors import UserInputError
from host.lora.sets import LoraSet, list_lsets, load_lset, resolve_lset, save_lset
from host.session import Session
from host.web.models import lora_files, lora_folder, lora_reports
from host.web.render import status_html

log = logging.getLogger(__name__)


class LoraPanel:
    """Handlers of the LoRA panel."""

    session: Session
    c: dict[str, Any]

    def _wire_loras(self, c: dict[str, Any]) -> None:
        report_inputs = [c["model"], c["loras"], c["loras_multipliers"]]
        c["loras"].change(self.on_lora_report, report_inputs, [c["lora_report"]], show_progress="hidden")
        c["loras_multipliers"].blur(self.on_lora_report, report_inputs, [c["lora_report"]], show_progress="hidden")
        c["lora_refresh"].click(
            self.on_lora_refresh, [c["model"]], [c["loras"], c["lset"], c["status"]], show_progress="hidden"
        )
        c["lset_load"].click(
            self.on_lset_load,
            [c["model"], c["lset"]],
            [c["loras"], c["loras_multipliers"], c["prompt"], c["status"]],
            show_progress="hidden",
        )
        c["lset_save"].click(
            self.on_lset_save,
            [c["model"], c["lset_name"], c["loras"], c["loras_multipliers"], c["prompt"]],
            [c["lset"], c["status"]],
            show_progress="hidden",
        )

    # -- LoRAs ----------------------------------------------------------------------------------

    def on_lora_report(self, model_type: str | None, loras: list[str] | None, multipliers: str | None) -> str:
        preset = self.session.catalog.presets.get(model_type or "")
        if preset is None or not loras:
            return ""
        try:
            return lora_reports(self.session, preset, list(loras), multipliers or "")
        except Exception as exc:  # noqa: BLE001 - a broken LoRA file must show as a message, not a dead field
            log.warning("LoRA report failed", exc_info=True)
            return f"**LoRA report failed: {type(exc).__name__}: {exc}**"

    def on_lora_refresh(self, model_type: str | None) -> tuple[Any, Any, str]:
        preset = self.session.catalog.presets.get(model_type or "")
        if preset is None:
            return gr.update(), gr.update(), status_html("Choose a model first.", "error")
        folder, files = lora_folder(self.session, preset), lora_files(self.session, preset)
        text = f"{len(files)} LoRA file(s) in {folder}" + (
            "" if folder.is_dir() else " (the folder does not exist yet)"
        )
        return gr.update(choices=files), gr.update(choices=list_lsets(folder)), status_html(text, "info")

    def on_lset_load(self, model_type: str | None, name: str | None) -> tuple[Any, Any, Any, str]:
        """Fill the LoRA fields from a set (and the prompt, when the set carries one)."""
        preset = self.session.catalog.presets.get(model_type or "")
        if preset is None or not name:
            return gr.update(), gr.update(), gr.update(), status_html("Choose a model and a LoRA set first.", "error")
        try:
            lset = load_lset(resolve_lset(name, self.session.lora_folders(preset), allow_absolute=False))
        except UserInputError as exc:
            return gr.update(), gr.update(), gr.update(), status_html(str(exc), "error")
        prompt = lset.prompt or gr.update()
        return gr.update(value=lset.loras), lset.loras_mult, prompt, status_html(f"LoRA set {name} loaded.", "success")

    def on_lset_save(
        self, model_type: str | None, name: str | None, loras: list[str] | None, mult: str | None, prompt: str | None
    ):
        preset = self.session.catalog.presets.get(model_type or "")
        if preset is None:
            return gr.update(), status_html("Choose a model first.", "error")
        folder = lora_folder(self.session, preset)
        try:
            path = save_lset(folder, (name or "").strip(), LoraSet(list(loras or []), mult or "", prompt or ""))
        except (UserInputError, OSError) as exc:
            return gr.update(), status_html(f"LoRA set not saved: {exc}", "error")
        return gr.update(choices=list_lsets(folder), value=path.name), status_html(f"LoRA set saved: {path}", "success")
