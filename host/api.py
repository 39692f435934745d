"""Python API: `wgp.load_model("z_image_base", **options).generate(prompt=..., seed=...)` -> PIL images.

Settings use the task-file names. One session (and one loaded model) is shared by the calls of a
process; `release_model()` frees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from host import settings as host_settings
from host.session import Destination, HostConfig, Session, TaskResult

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
