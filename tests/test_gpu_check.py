"""The GPU check (bench/gpu_check.sh and its stages): skipped without CUDA, its dry run (every stage's code on the
CPU with the tiny model, fp32), one stage over its limit or out of budget never costing the others, and the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check_report as report

REPO = Path(__file__).resolve().parents[1]
SH = REPO / "bench" / "gpu_check.sh"
# Every row of the table, by its key: a (ours, diffusers, ratio), b (build, VRAM, 3 profiles), c, d (the blocks,
# the product's --compile), e (4 backends), between the packages and pytest.
ROW_KEYS = ["-"] + ["a"] * 3 + ["b"] * 5 + ["c", "d", "d"] + ["e"] * 4 + ["f"] + ["-"]


def _check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """bash bench/gpu_check.sh with this interpreter, its output under tmp_path/out."""
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), **env}
    return subprocess.run(["bash", str(SH), *args], capture_output=True, text=True, env=env, timeout=600)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _table(text: str) -> list[list[str]]:
    """The markdown table's body rows, split into cells."""
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header row


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_gpu_check_reports_a_failure_as_a_row(tmp_path: Path) -> None:
    """No files built: the run fails with a row that says why (and a non-zero exit), not a traceback only."""
    ran = _script("run", "--workdir", str(tmp_path), "--tiny", "--device", "cpu", "--size", "64")
    assert ran.returncode == 1
    row = json.loads(ran.stdout.strip().splitlines()[-1])
    assert row["ok"] is False and "missing" in row["error"].lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_check_is_skipped_in_one_line(tmp_path: Path) -> None:
    ran = _check(tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.splitlines() == [ran.stdout.strip()] and ran.stdout.startswith("no CUDA: skipped")
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


@pytest.mark.isolated  # the build stage quantizes and the profile stage runs int8 layers (in fp32)
def test_dry_run_runs_every_stage_and_prints_one_table(tmp_path: Path) -> None:
    ran = _check(tmp_path, "--dry-run")
    out = tmp_path / "out"
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert table in ran.stdout and "DRY RUN" in table
    stages = {s["stage"]: s for s in _jsonl(out / "stages.jsonl")}
    ran_stages = ["packages", "transformer", "build", "profile4", "lora", "attention", "vae", "compile", "profile4_compile"]
    assert all(stages[name]["exit"] == 0 for name in ran_stages), stages
    assert {stages[name]["skipped"] for name in ("profile5", "profile1", "pytest")} <= {"dry run", "dry run: the same code as profile 4"}
    variant = {"attention": "backend", "profile": "compile"}  # what tells a stage's rows apart
    rows = {(r["stage"], r.get(variant.get(r["stage"], ""))): r for r in _jsonl(out / "results.jsonl")}

    step = rows[("transformer", None)]  # the same tensors in both models, fp32: the same output exactly
    assert step["rel_diff"] == 0.0 and step["ours_s"] > 0 and step["diffusers_s"] > 0
    assert step["ratio"] == pytest.approx(step["ours_s"] / step["diffusers_s"], abs=1e-3)
    assert step["floor_s"] > 0 and 0 < step["ours_of_floor"] == pytest.approx(step["floor_s"] / step["ours_s"], rel=0.01, abs=1e-3)
    ckpts = tmp_path / "work" / "dry" / "ckpts"
    for name in ("ZImageTurbo_quanto_bf16_int8.safetensors", "Qwen3/qwen3_quanto_bf16_int8.safetensors", "Qwen3/config.json",
                 "Qwen3/tokenizer.json", "ZImageTurbo_VAE_bf16.safetensors", "ZImageTurbo_VAE_bf16_config.json"):
        assert (ckpts / name).is_file(), name
    assert rows[("build", None)]["built_on"] == "cpu"
    profile = rows[("profile", False)]
    assert profile["ok"] and profile["profile"] == "4" and profile["steps"] == 2 and profile["s_per_it"] > 0
    product = rows[("profile", True)]  # --compile through wgp.load_model: the first generation compiled the 4 blocks
    assert product["ok"] and product["first_compile_report"]["used"] is True and product["first_compile_report"]["blocks"] == 4
    assert product["first_compile_s"] > 0 and product["s_per_it"] > 0 and "compile_s" not in product
    lora = rows[("lora", None)]  # tiny config: 4 blocks x (q, k, v, out, w1, w2, w3), all matched by host/lora
    assert lora["modules_written"] == lora["modules_matched"] == 28
    assert lora["lora_changes_output"] > 1e-3 and lora["removed_restores"] is True and lora["with_s"] > 0
    compiled = rows[("compile", None)]
    assert compiled["blocks"] == 4 and compiled["rel_diff"] < 1e-5 and compiled["first_call_s"] > 0
    assert rows[("attention", "sdpa")]["status"] == "measured" and rows[("attention", "sdpa")]["rel_diff_vs_sdpa"] == 0
    for name in ("flash", "sage", "sage2"):
        assert "s" in rows[("attention", name)] or rows[("attention", name)]["status"].startswith("not installed")
    vae = rows[("vae", None)]  # fp32, 64x64: nothing big enough to stream, so the lean walk's pixels are the stock ones
    assert vae["stock_s"] > 0 and vae["lean_s"] > 0 and vae["max_abs_diff"] < 1e-5 and vae["lean_peak_gb"] is None

    body = _table(table)
    assert [row[0] for row in body] == ROW_KEYS
    measured = [row for row in body if row[0] in "abcd" and "skipped" not in row[3]]
    assert len(measured) == 9 and all(row[2] != "-" for row in measured), measured


def test_a_stage_over_its_limit_costs_only_its_limit(tmp_path: Path) -> None:
    """The transformer stage gets 2 s (it needs more): it is cut there, and the attention stage still runs."""
    ran = _check(tmp_path, "--dry-run", ONLY="transformer attention", LIMIT_transformer="2")
    out = tmp_path / "out"
    assert ran.returncode == 1, ran.stderr[-2000:]  # a stage timed out
    stages = {s["stage"]: s for s in _jsonl(out / "stages.jsonl")}
    assert stages["transformer"]["exit"] == 124 and stages["transformer"]["seconds"] <= 4
    assert stages["attention"]["exit"] == 0 and stages["lora"]["skipped"].startswith("not selected")
    body = _table((out / "table.md").read_text())
    assert [row[3] for row in body if row[0] == "a"] == ["timed out after 2 s (log: logs/transformer.log)"] * 3
    sdpa = next(row for row in body if row[1] == "attention backend sdpa")
    assert sdpa[2].endswith("s/step")


def test_no_stage_starts_past_the_budget(tmp_path: Path) -> None:
    ran = _check(tmp_path, "--dry-run", BUDGET_S="25")  # 25 s - 10 s kept for the table < 20 s a stage needs
    out = tmp_path / "out"
    assert ran.returncode == 1
    stages = _jsonl(out / "stages.jsonl")
    assert all("exit" not in s for s in stages) and len(stages) == 12
    body = _table((out / "table.md").read_text())
    assert [row[0] for row in body] == ROW_KEYS
    assert all(row[3].startswith("skipped: ") for row in body)
    assert sum("no time left in the 25 s budget" in row[3] for row in body) == 15


def test_table_shows_a_stage_error_and_a_failed_stage(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "lora.log").write_text("Traceback ...\nRuntimeError: CUDA error: an illegal memory access\n")
    rows = [{"stage": "compile", "ok": False, "error": "BackendCompilerFailed: inductor | failed\nmore"},
            {"stage": "profile", "profile": "5", "ok": False, "error": "OutOfMemoryError: CUDA out of memory"}]
    stages = [{"stage": "lora", "exit": 1, "seconds": 9, "limit": 150}, {"stage": "compile", "exit": 1}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"truncated": \n')
    (tmp_path / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    body = {row[1]: row for row in _table(report.render(tmp_path))}
    assert body["profile 5, int8, cap 8 GiB"][2:] == ["error", "OutOfMemoryError: CUDA out of memory"]
    assert body["torch.compile of the transformer blocks: compiled vs eager"][3] == "BackendCompilerFailed: inductor / failed"
    lora = next(row for name, row in body.items() if name.startswith("rank-32"))
    assert lora[3] == "failed, exit 1: RuntimeError: CUDA error: an illegal memory access (log: logs/lora.log)"
    assert body["profile 4, int8, cap 8 GiB"][3] == "not run"


def test_packages_are_checked_against_the_pinned_requirements(tmp_path: Path) -> None:
    import importlib.metadata

    torch_version = importlib.metadata.version("torch").split("+")[0]
    pins = tmp_path / "requirements.txt"
    pins.write_text(f"torch=={torch_version}\nsafetensors==0.0.1\nsurely-not-a-package-xyz==1.0\ngradio-not-here==1.0\n"
                    "# a comment\nruff==0.0.1 ; python_version > '3'\n")
    missing, optional, other = report.check_packages(pins)
    assert missing == ["surely-not-a-package-xyz", "gradio-not-here"]
    assert any(o.startswith("safetensors ") and o.endswith("(pinned 0.0.1)") for o in other)
    assert not any(o.startswith("torch ") for o in other) and optional in ([], ["ruff"])


def test_the_floor_counts_62_5_tflop_per_forward_at_the_full_shape() -> None:
    """Row a's floor: transformer_flops for one row of 4096 image + 512 caption tokens, twice for the CFG batch."""
    from bench.gpu_check_speed import floor_fields, make_shape, model_config

    shape = make_shape(False, "cuda")
    assert (shape.size, shape.caption, shape.dtype, shape.image_tokens) == (1024, 512, torch.bfloat16, 4096)
    fields = floor_fields(shape, model_config(shape), rate=1e15, seconds={"ours": 0.25})
    assert fields["tflop_per_forward"] == pytest.approx(62.492, abs=1e-3)  # REFERENCE.md section 7: 52.2 + 10.3
    assert fields["floor_s"] == pytest.approx(2 * 62.4918e12 / 1e15, rel=1e-4)
    assert fields["ours_of_floor"] == pytest.approx(fields["floor_s"] / 0.25, abs=1e-3)
