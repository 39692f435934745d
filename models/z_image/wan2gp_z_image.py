"""Where Wan2GP runs Z-Image differently from this program, applied to settings Wan2GP wrote.

The handler's `fix_settings` (Wan2GP's name for the hook that migrates saved settings) calls
`fix_wan2gp_settings` for a task the host read from a Wan2GP file; each change comes back as a one-line note.
- Guidance: Wan2GP, like the official Z-Image code, guides only when guidance_scale > 1; this program follows
  diffusers and guides when it is > 0 (REFERENCE.md section 4). A Wan2GP file with 0 < guidance <= 1 ran
  without guidance there, so it runs without guidance here (guidance_scale 0).
- Shift: Wan2GP does not pass flow_shift to Z-Image (its sampler uses the model's own shift), so a Wan2GP
  flow_shift is dropped and the model type's shift applies.
- Negative prompt: with guidance on and an empty negative prompt, Wan2GP puts a default negative prompt in;
  here the family's default negative prompt is used (it may not be Wan2GP's word for word).
"""

from __future__ import annotations

from typing import Any


def fix_wan2gp_settings(settings: dict[str, Any], default_shift: float, default_negative: str) -> list[str]:
    """Change `settings` (a Wan2GP task, in place) to run here as it ran in Wan2GP; returns the notes."""
    notes = []
    guidance = _number(settings.get("guidance_scale"))
    if guidance is not None and 0 < guidance <= 1:
        settings["guidance_scale"] = 0.0
        notes.append(
            f"guidance_scale {guidance:g} is no guidance in Wan2GP (it guides above 1, this program above 0): "
            "run with guidance_scale 0"
        )
        guidance = 0.0
    if "flow_shift" in settings:
        shift = settings.pop("flow_shift")
        if _number(shift) != default_shift:
            notes.append(f"flow_shift {shift} dropped: Wan2GP does not use it for Z-Image (the model's shift {default_shift:g} applies)")
    negative = settings.get("negative_prompt")
    if guidance is not None and guidance > 1 and (negative is None or not str(negative).strip()):
        settings["negative_prompt"] = default_negative
        notes.append("empty negative prompt with guidance on: the default negative prompt is used, as Wan2GP does")
    return notes


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
