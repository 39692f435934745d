"""Python API: `wgp.load_model("z_image_base", **options).generate(prompt=..., seed=...)` -> PIL images.

Settings use the task-file names. One session (and one loaded model) is shared by the calls of a
process; `release_model()` frees it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from host import settings as host_settings
from host.session import Destination, HostConfig, Session, TaskResult

log = logging.getLogger(__name__)
_SESSION: Session | None = None


def get_session(config: HostConfig | None = None) -> Session:
    """The process-wide session (a new config replaces it, releasing its model)."""
    global _SESSION
    if _SESSION is None or (config is not None and config != _SESSION.config):
        if _SESSION is not None:
            _SESSION.release()
        _SESSION = Session(config)
    return _SESSION


class Model:
    """A loaded model type; `generate` takes the settings of a task file as keyword arguments."""

    def __init__(self, session: Session, model_type: str, defaults: dict[str, Any]):
        self.session = session
        self.model_type = model_type
        self.defaults = defaults
        self.last_result: TaskResult | None = None
        self.last_notes: list[str] = []  # generate_from: what was converted to run another tool's file

    def generate(self, prompt: str | None = None, *, output_dir: str | Path | None = None, **settings: Any) -> list[Any]:
        """Generate images (PIL). `output_dir` also saves them as the CLI does (settings embedded).

        Settings are the task-file names; diffusers' `width=`/`height=` work too (they become `resolution`).
        The used seed and the full settings are in `self.last_result.settings`.
        """
        raw = {**host_settings.overlay(self.defaults, settings), "model_type": self.model_type}
        if prompt is not None:
            raw["prompt"] = prompt
        task = self.session.prepare(raw, "generate()")
        if output_dir is not None:  # a folder that cannot take the images fails now, not after generating
            self.session.check_destination(Path(output_dir))
        save_to = Destination(Path(output_dir)) if output_dir is not None else None
        self.last_result = self.session.run(task, save_to=save_to)
        return self.last_result.images

    def generate_from(self, path: str | Path, *, output_dir: str | Path | None = None, **settings: Any) -> list[Any]:
        """Generate from the settings a file holds, on this model type: any file `--process` reads (our JSON and
        images, Wan2GP's settings, queues and images, ComfyUI and A1111 images); `settings` and `load_model`'s
        override the file's. A file with several tasks runs them all (images in order). What was converted to
        run another tool's file as it meant is logged, one line per note, and kept in `self.last_notes`."""
        from host.tasks import override_tasks, read_task_file  # the task-file readers, only when asked for

        images: list[Any] = []
        self.last_notes = []
        overrides = {**self.defaults, **settings, "model_type": self.model_type}  # load_model's settings hold too
        for raw in override_tasks(read_task_file(Path(path)), overrides):
            task = self.session.prepare(raw.settings, raw.where, source=raw.source)
            notes = [*raw.notes, *task.notes]
            for note in notes:
                log.info("%s: %s", raw.where, note)
            self.last_notes += notes
            if output_dir is not None:
                self.session.check_destination(Path(output_dir))
            self.last_result = self.session.run(task, save_to=Destination(Path(output_dir)) if output_dir is not None else None)
            images += self.last_result.images
        return images

    @property
    def lora_reports(self) -> list[dict[str, Any]]:
        """Load reports (`LoraReport.to_dict()`) of the LoRAs applied: the last `generate`'s, else the loaded model's."""
        if self.last_result is not None:
            return list(self.last_result.lora_reports)
        return [r.to_dict() for r in self.session.lora_reports()]

    def release(self) -> None:
        """Free the model's memory (the next `generate` loads it again)."""
        self.session.release()


def load_model(
    model_type: str,
    *,
    checkpoints_dirs: list[str | Path] | None = None,
    ckpts: str | Path | None = None,
    offline: bool = False,
    device: str | None = None,
    config: HostConfig | None = None,
    **defaults: Any,
) -> Model:
    """Load (downloading if needed) a model type; `defaults` are settings for every `generate` call.

    Loading happens now, so a missing file or a bad setting is reported here, not at the first image.
    `config` (folders of models, presets, checkpoints) replaces the other folder options when given.
    """
    if config is None:
        config = HostConfig(extra_ckpts=[Path(p) for p in checkpoints_dirs or []], allow_download=not offline, device=device)
        if ckpts is not None:
            config.ckpts = Path(ckpts)
    session = get_session(config)
    task = session.prepare({**defaults, "model_type": model_type}, "load_model()")
    session.model_for(task, session.files_for(task))
    return Model(session, model_type, defaults)


def release_model() -> None:
    """Free the loaded model, if any."""
    if _SESSION is not None:
        _SESSION.release()
