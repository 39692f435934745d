"""bench/gpu_check.py's dry run: the memory-capped full-size check's code path, with tiny weights on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.isolated  # it quantizes and runs int8 layers
def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    built = _script("build", "--workdir", str(tmp_path), "--tiny")
    assert built.returncode == 0, built.stderr[-3000:]
    ckpts = tmp_path / "ckpts"
    for name in (
        "ZImageTurbo_quanto_bf16_int8.safetensors",
        "Qwen3/qwen3_quanto_bf16_int8.safetensors",
        "Qwen3/config.json",
        "Qwen3/tokenizer.json",
        "ZImageTurbo_VAE_bf16.safetensors",
        "ZImageTurbo_VAE_bf16_config.json",
    ):
        assert (ckpts / name).is_file(), name
    ran = _script("run", "--workdir", str(tmp_path), "--tiny", "--device", "cpu", "--size", "64", "--steps", "2")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    row = json.loads(ran.stdout.strip().splitlines()[-1])
    assert row["ok"] is True and row["steps"] == 2 and row["size"] == 64
    assert row["s_per_it"] > 0 and row["vae_decode_s"] > 0 and row["load_s"] > 0
    recorded = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert recorded == [row]


def test_gpu_check_reports_a_failure_as_a_row(tmp_path: Path) -> None:
    """No files built: the run fails with a row that says why (and a non-zero exit), not a traceback only."""
    ran = _script("run", "--workdir", str(tmp_path), "--tiny", "--device", "cpu", "--size", "64")
    assert ran.returncode == 1
    row = json.loads(ran.stdout.strip().splitlines()[-1])
    assert row["ok"] is False and "missing" in row["error"].lower()
