"""`compile` (host/compile.py): the tiny model's repeated blocks compiled by torch.compile on the CPU give the eager
image, at a second size too, follow LoRAs attached and removed under them, are undone without a trace, and reach
the saved image through the CLI; a compile that fails (no C++ compiler) runs eager with one warning. Under mmgp
(CUDA) the setting reaches mmgp's own compile.

The compiling tests run in their own process (`isolated`: inductor builds and loads native code)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lora_fixtures import DIALECTS, NORMALIZER, random_lora
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from host import cli
from host.compile import CompileTransform, extra_seconds, repeated_blocks
from host.lora import LoraTransform
from host.lowvram import apply_lowvram, load_options
from host.registry import REPO_ROOT
from host.session import HostConfig, Session
from tests.fixtures.pipelines import flat_pipeline

# Inductor builds C++ on the CPU: without a compiler the feature runs eager (test_a_failing_compile_... covers that).
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")),
    reason="torch.compile on the CPU needs a C++ compiler (g++)",
)
SETTINGS = dict(prompt="a red fox", width=64, height=64, num_inference_steps=2, guidance_scale=0.0, seed=5)


def _facts() -> Any:
    from models.z_image.z_image_handler import ZImageHandler

    return ZImageHandler().query_model_facts("z_image", {})


def _image(pipe: Any, **overrides: Any) -> np.ndarray:
    return np.asarray(pipe.generate({**SETTINGS, **overrides}).images[0]).astype(np.int16)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


# -- fast: no compiling ----------------------------------------------------------------------------------------------


def test_extra_seconds_is_the_time_over_the_steady_forwards() -> None:
    """Steady = median of the forwards after the first (1.0 here); the extra is what lies above it."""
    assert extra_seconds([12.5, 1.0, 1.2, 0.9, 1.0]) == pytest.approx(11.5 + 0.2)
    assert extra_seconds([3.0, 1.0]) == pytest.approx(2.0)
    assert extra_seconds([4.0]) == 4.0  # one forward: all of it, an upper bound


def test_blocks_are_found_by_the_class_names_a_part_declares() -> None:
    class Block(nn.Module):
        pass

    class Model(nn.Module):
        _repeated_blocks = ("Block",)

        def __init__(self) -> None:
            super().__init__()
            self.stack = nn.ModuleList([Block(), Block(), nn.Linear(2, 2)])

    assert [type(m).__name__ for m in repeated_blocks(Model())] == ["Block", "Block"]
    assert repeated_blocks(nn.Sequential(Block())) == []  # nothing declared: nothing compiled


def test_the_transformer_declares_its_blocks(tiny_flat_layout: dict[str, Path]) -> None:
    pipe = flat_pipeline(tiny_flat_layout)
    cfg = pipe.transformer.config
    assert len(repeated_blocks(pipe.transformer)) == cfg.n_layers + 2 * cfg.n_refiner_layers


def test_compile_is_a_host_setting_off_by_default(tmp_path: Path) -> None:
    from tests.fixtures.host_env import toy_env

    session = Session(toy_env(tmp_path))
    assert session.prepare({"model_type": "toy"}).settings["compile"] is False
    assert session.prepare({"model_type": "toy", "compile": True}).settings["compile"] is True
    with pytest.raises(Exception, match="compile"):
        session.prepare({"model_type": "toy", "compile": "fast"})
    parser = cli.build_parser(session)
    assert parser.parse_args(["--compile"]).compile is True and parser.parse_args([]).compile is None  # None: preset's


def test_under_mmgp_the_setting_reaches_its_own_compile(monkeypatch: pytest.MonkeyPatch, tiny_flat_layout: dict[str, Path]) -> None:
    """On CUDA mmgp's profile() compiles (host/lowvram/offload.py compile_parts): the parts declaring repeated
    blocks are named in its `compile` argument, and nothing is passed without the setting."""
    calls: list[dict[str, Any]] = []

    def profile(parts: dict[str, Any], profile_no: int, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return SimpleNamespace(unload_all=lambda: None, release=lambda: None)

    monkeypatch.setattr("host.lowvram.mmgp_import.import_mmgp_offload", lambda: SimpleNamespace(profile=profile))
    try:
        for compile_on in (True, False):
            pipe = flat_pipeline(tiny_flat_layout)
            options = load_options({"device": "cuda", "dtype": torch.float32, "quantization": "fp32", "profile": 4, "compile": compile_on})
            apply_lowvram(pipe, options, {}, _facts()).clear()
    finally:
        torch.set_default_device(None)
    assert calls[0]["compile"] == ["transformer"] and "compile" not in calls[1]


# -- compiling (own process) -----------------------------------------------------------------------------------------


@needs_cxx
@pytest.mark.isolated
def test_compiled_blocks_give_the_eager_image_at_two_sizes_and_follow_loras(
    tiny_flat_layout: dict[str, Path], tmp_path: Path
) -> None:
    """One compiled model for every check: 64x64 and 128x96 within 1/255 of eager (fp32), the compile seconds
    reported only when something was compiled (first run, after LoRAs changed), a LoRA attached after compiling
    (PyTorch would silently keep the code compiled without its hooks) and removed again, and removal leaves the
    eager model."""
    pipe = flat_pipeline(tiny_flat_layout)
    eager, eager_wide = _image(pipe), _image(pipe, width=128, height=96)  # 64 image tokens instead of 32
    lora_path = tmp_path / "style.safetensors"
    save_file({k: v.contiguous() for k, v in DIALECTS["ai-toolkit"](random_lora(pipe.transformer, seed=2)).items()}, str(lora_path))
    lora = LoraTransform([lora_path], "1.0", normalizer=NORMALIZER)
    lora.apply(pipe)
    eager_lora = _image(pipe)
    lora.remove(pipe)
    assert _max_diff(eager_lora, eager) > 5  # the LoRA changes the image: the comparison below means something

    compiled = CompileTransform(_facts())
    compiled.apply(pipe)
    assert len(compiled.blocks) == 4 and all(b._compiled_call_impl is not None for b in compiled.blocks)
    assert _max_diff(_image(pipe), eager) <= 1
    first = compiled.last_report
    assert first.used and first.blocks == 4 and first.compile_s is not None and first.compile_s > 0
    assert _max_diff(_image(pipe), eager) <= 1 and compiled.last_report.compile_s is None  # nothing compiled again
    # A new size: the blocks' graphs are already dynamic in the sequence length (the refiner and main blocks share
    # one compiled code object and see different lengths in the first step), so it runs without compiling again.
    assert _max_diff(_image(pipe, width=128, height=96), eager_wide) <= 1

    lora.apply(pipe)  # hooks added under compiled code: it is compiled again, with them
    assert _max_diff(_image(pipe), eager_lora) <= 1 and compiled.last_report.compile_s is not None
    lora.remove(pipe)
    assert _max_diff(_image(pipe), eager) <= 1

    compiled.remove(pipe)
    assert all(b._compiled_call_impl is None for b in compiled.blocks) and pipe.hooks.owners() == {}
    assert not pipe.transformer._forward_hooks and not pipe.transformer._forward_pre_hooks


@needs_cxx
@pytest.mark.isolated
def test_cli_compile_flag_end_to_end_and_the_cached_model_follows_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--compile on the self-test model: the timing line gives the compile seconds, the saved image keeps the
    setting and the report. Then one session: the cached model gets compiled for a task that asks, and back."""
    args = ["--ckpts", str(tmp_path / "ckpts"), "--output-dir", str(tmp_path / "out"), "--offline", "--device", "cpu"]
    assert cli.main(["--model", "z_image_selftest", "--prompt", "a fox", "--seed", "2", "--compile", *args]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "seed 2 |" in ln][0]
    assert " s of it |" in line and "| compile " in line
    [saved] = (tmp_path / "out").glob("*.png")
    settings = json.loads(Image.open(saved).info["wgp_settings"])
    info = settings["generation_info"]
    assert settings["compile"] is True and info["compile"]["used"] is True and info["compile"]["blocks"] == 4
    assert info["compile"]["compile_s"] > 0 and info["timings"]["compile_s"] == pytest.approx(info["compile"]["compile_s"], abs=1e-3)

    session = Session(HostConfig(ckpts=tmp_path / "ckpts", output_dir=tmp_path / "out2", allow_download=False, device="cpu"))
    plain = session.run(session.prepare({"model_type": "z_image_selftest", "seed": 2}))
    assert "compile" not in plain.info
    on = session.run(session.prepare({"model_type": "z_image_selftest", "seed": 2, "compile": True}))
    blocks = session.transform("compile").blocks
    assert on.load_s is None and on.info["compile"]["used"] and all(b._compiled_call_impl is not None for b in blocks)
    off = session.run(session.prepare({"model_type": "z_image_selftest", "seed": 2}))
    assert off.load_s is None and session.transform("compile") is None and all(b._compiled_call_impl is None for b in blocks)
    images = [np.asarray(r.images[0]).astype(np.int16) for r in (plain, on, off)]
    assert _max_diff(images[0], images[1]) <= 1 and np.array_equal(images[0], images[2])


def test_a_failing_compile_runs_eager_with_one_warning(tmp_path: Path) -> None:
    """inductor without a C++ compiler (CXX points nowhere, an empty compile cache) in a child process: the task
    succeeds with the eager image, warns once, and the saved image says compile was not used and why. With a step
    cache on, the failed evaluation is rerun below it: the cache counts each of the 4 evaluations once."""
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # no compiled kernels to reuse
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    }
    args = ["--ckpts", str(tmp_path / "ckpts"), "--offline", "--device", "cpu", "--prompt", "a fox", "--seed", "2", "--cache", "fast"]
    command = [sys.executable, "wgp.py", "--model", "z_image_selftest", *args]
    child = subprocess.run(
        [*command, "--compile", "--output-dir", str(tmp_path / "on")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 0, child.stdout + child.stderr
    warnings = [ln for ln in child.stderr.splitlines() if "compile:" in ln and "running eager" in ln]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0], child.stderr[-3000:]
    assert "| compile " not in child.stdout
    eager = subprocess.run(
        [*command, "--output-dir", str(tmp_path / "off")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert eager.returncode == 0, eager.stderr
    [on], [off] = (tmp_path / "on").glob("*.png"), (tmp_path / "off").glob("*.png")
    info = json.loads(Image.open(on).info["wgp_settings"])["generation_info"]
    assert info["compile"]["used"] is False and "compiler" in info["compile"]["reason"].lower()
    assert info["step_cache"]["evaluations"] == info["step_cache"]["forwards"] == 4
    assert np.array_equal(np.asarray(Image.open(on)), np.asarray(Image.open(off)))
