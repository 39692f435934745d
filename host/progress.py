"""Terminal progress: one bar per task (steps, s/it, ETA) and a per-stage timing line."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

BAR_WIDTH = 28


def format_duration(seconds: float) -> str:
    """72.4 -> '1:12'; 3725 -> '1:02:05'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """Redraws `label [#####.....] 5/8 1.23 s/it ETA 0:04` in place on a terminal."""

    def __init__(self, label: str, stream: TextIO | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.drawn = False

    def __call__(self, event: Any) -> None:
        """Step callback: `event` has step (1-based), total and elapsed_s."""
        self.update(event.step, event.total, event.elapsed_s)

    def update(self, step: int, total: int, elapsed_s: float) -> None:
        per_it = elapsed_s / max(step, 1)
        filled = int(BAR_WIDTH * step / max(total, 1))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        eta = format_duration(per_it * (total - step))
        line = f"{self.label} [{bar}] {step}/{total} {per_it:.2f} s/it ETA {eta}"
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if step >= total else ""))
            self.drawn = step < total
        elif step >= total or step * 10 // total != (step - 1) * 10 // total:
            self.stream.write(line + "\n")  # logs and pipes: about one line per 10%
        self.stream.flush()

    def close(self) -> None:
        """Finish a bar left half-drawn (cancel or error)."""
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False


def format_steps(steps: list[int]) -> str:
    """[5, 7, 8, 9, 12] -> '5, 7-9, 12'."""
    runs: list[list[int]] = []
    for step in sorted(steps):
        if runs and step == runs[-1][-1] + 1:
            runs[-1].append(step)
        else:
            runs.append([step])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def timing_line(
    timings: Mapping[str, float],
    peak_gb: float,
    peak_what: str,
    load_s: float | None = None,
    step_cache: Mapping[str, Any] | None = None,
) -> str:
    """'load 3.1 s | text encoding 0.20 s | denoise 4.10 s (0.51 s/it) | VAE decode 0.30 s | peak RSS 2.1 GB';
    with a step cache report (host/cache/step_cache.py), '| step cache fast: 18/30 forwards, skipped steps 5, 7-9'."""
    parts = [f"load {load_s:.1f} s"] if load_s is not None else []
    if "text_encoding_s" in timings:
        parts.append(f"text encoding {timings['text_encoding_s']:.2f} s")
    if "vae_encode_s" in timings:  # an input image encoded (image-to-image, inpainting)
        parts.append(f"VAE encode {timings['vae_encode_s']:.2f} s")
    if "denoise_s" in timings:
        parts.append(f"denoise {timings['denoise_s']:.2f} s ({timings.get('s_per_it', 0.0):.2f} s/it)")
    if "compile_s" in timings:  # torch.compile's share of the denoise time (host/compile.py)
        parts.append(f"compile {timings['compile_s']:.2f} s of it")
    if "vae_decode_s" in timings:
        parts.append(f"VAE decode {timings['vae_decode_s']:.2f} s")
    parts.append(f"{peak_what} {peak_gb:.2f} GB")
    if step_cache is not None:
        skipped = format_steps(list(step_cache.get("skipped_steps", []))) or "none"
        forwards = f"{step_cache.get('forwards')}/{step_cache.get('evaluations')} forwards"
        parts.append(f"step cache {step_cache.get('level')}: {forwards}, skipped steps {skipped}")
    return " | ".join(parts)
