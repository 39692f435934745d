"""Device/dtype choice, attention rules by compute capability, progress and timing lines."""

from __future__ import annotations

import io

import pytest
import torch

from common.errors import SettingsError
from host.device import attention_backend, choose_device, peak_memory_gb
from host.progress import ProgressBar, format_duration, timing_line


def test_cpu_runs_in_fp32() -> None:
    choice = choose_device("cpu")
    assert (choice.device, choice.dtype, choice.capability) == ("cpu", torch.float32, None)
    assert choice.label == "CPU (float32)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="no CUDA GPU"):
        choose_device("cuda")
    with pytest.raises(SettingsError, match="unknown device 'tpu'"):
        choose_device("tpu")


@pytest.mark.parametrize(
    ("setting", "rules", "capability", "expected"),
    [
        ("auto", {"<89": "sdpa_math"}, 86, "sdpa_math"),
        ("auto", {"<89": "sdpa_math"}, 90, "auto"),  # no rule matches on a GPU: the dispatch picks
        ("auto", {">=90": "flash", "<90": "sage"}, 90, "flash"),
        ("auto", {"bogus": "x", "==80": "y"}, 80, "y"),
        ("auto", {"<89": "sdpa_math"}, None, "sdpa"),  # CPU
        ("sage", {"<89": "sdpa_math"}, 86, "sage"),  # an explicit setting wins
    ],
)
def test_attention_backend_rules(setting: str, rules: dict[str, str], capability: int | None, expected: str) -> None:
    assert attention_backend(setting, rules, capability) == expected


def test_peak_memory_on_cpu_is_rss() -> None:
    gb, what = peak_memory_gb("cpu")
    assert what in ("peak RSS", "RSS") and 0 < gb < 1000


def test_progress_bar_in_a_log_shows_steps_rate_and_eta() -> None:
    stream = io.StringIO()
    bar = ProgressBar("[1/1] z_image", stream)
    for step in range(1, 31):
        bar.update(step, 30, 0.5 * step)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10  # about one line per 10% when not a terminal
    assert lines[0] == "[1/1] z_image [##..........................] 3/30 0.50 s/it ETA 0:14"
    assert lines[-1].endswith("30/30 0.50 s/it ETA 0:00")


def test_timing_line_and_durations() -> None:
    timings = {"text_encoding_s": 0.2, "denoise_s": 4.0, "s_per_it": 0.5, "vae_decode_s": 0.3}
    assert timing_line(timings, 2.5, "peak VRAM", 3.14) == (
        "load 3.1 s | text encoding 0.20 s | denoise 4.00 s (0.50 s/it) | VAE decode 0.30 s | peak VRAM 2.50 GB"
    )
    with_image = {**timings, "vae_encode_s": 0.5}
    assert timing_line(with_image, 2.5, "peak RSS").startswith("text encoding 0.20 s | VAE encode 0.50 s | denoise 4.00 s")
    assert (format_duration(72.4), format_duration(3725)) == ("1:12", "1:02:05")
