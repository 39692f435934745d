"""The step cache (host/cache/step_cache.py): EasyCache's decisions worked by hand, the real transformer skipped
through the pipeline's `predict` hook (never by replacing a method), and the `cache` setting end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import SettingsError
from common.model_facts import StepCacheLevel
from host import cli
from host.cache.step_cache import StepCache, StepCacheTransform, cache_level
from host.progress import format_steps
from host.session import Session
from tests.fixtures.host_env import toy_env
from tests.fixtures.pipelines import flat_pipeline


def denoiser(x: torch.Tensor) -> torch.Tensor:
    """A denoiser whose output is 3 x + 10: its transformation rate k is exactly 3."""
    return 3 * x + 10


def run_steps(cache: StepCache, total: int, dx: float = 0.1) -> list[float]:
    """`total` steps with inputs x_s = s * dx (2x2 tensors); the outputs' first values."""
    outputs = []
    for step in range(total):
        cache.start_step(step, total)
        x = torch.full((1, 1, 2, 2), step * dx)
        outputs.append(float(cache.evaluate(lambda t: denoiser(t), x)[0, 0, 0, 0]))
    cache.finish()
    return outputs


def test_easycache_decisions_by_hand() -> None:
    """tau 0.1, warm-up 0.2 of 10 steps = steps 1-2 computed; then eps = k |dx| / |v| = 3 * 0.1 / 10.3 = 0.0291
    per step: E = 0.029, 0.058, 0.087 (steps 3-5 reuse), 0.117 >= 0.1 at step 6 (computed, E back to 0, v = 11.5),
    then eps = 0.3 / 11.5 = 0.026: steps 7-9 reuse, and the last step is always computed."""
    cache = StepCache(StepCacheLevel("fast", threshold=0.1, warmup=0.2))
    outputs = run_steps(cache, 10)
    report = cache.report
    assert report.skipped_steps == [3, 4, 5, 7, 8, 9]
    assert (report.forwards, report.evaluations, report.steps) == (4, 10, 10)
    # a reused step answers x_t + (v_i - x_i) from the last computed step i: step 3 (x 0.2) from step 2 (x 0.1)
    assert outputs[2] == pytest.approx(0.2 + (denoiser(torch.tensor(0.1)).item() - 0.1))
    assert outputs[6] == pytest.approx(0.6 + (11.5 - 0.5))  # from step 6 (x 0.5, v 11.5)
    assert outputs[5] == pytest.approx(denoiser(torch.tensor(0.5)).item()) and outputs[9] == pytest.approx(12.7)


def test_a_larger_threshold_skips_until_the_last_step() -> None:
    """tau 0.25: E after n reused steps is n * 0.0291, still < 0.25 after 7: steps 3-9 reuse, step 10 is computed."""
    cache = StepCache(StepCacheLevel("faster", threshold=0.25, warmup=0.2))
    run_steps(cache, 10)
    assert cache.report.skipped_steps == list(range(3, 10)) and cache.report.forwards == 3


def test_a_new_generation_starts_afresh() -> None:
    cache = StepCache(StepCacheLevel("fast", threshold=0.1, warmup=0.2))
    run_steps(cache, 10)
    run_steps(cache, 10, dx=2.0)  # eps = 3 * 2 / |v| >= 6 / 52 > 0.1: nothing reused, no state kept from the first
    assert cache.report.skipped_steps == [] and cache.report.forwards == 10


def test_format_steps() -> None:
    assert format_steps([5, 7, 8, 9, 12]) == "5, 7-9, 12" and format_steps([]) == ""


# -- through the pipeline: the real transformer, counted by a PyTorch forward hook -----------------------------------

SETTINGS = dict(prompt="a red fox", negative_prompt="blurry", width=64, height=64, num_inference_steps=12,
                guidance_scale=4.0, flow_shift=6.0, seed=3)


@pytest.fixture(scope="module")
def pipe(tiny_flat_layout: dict[str, Path]):
    return flat_pipeline(tiny_flat_layout)


def _generate(pipe, level: StepCacheLevel | None, **overrides) -> tuple[np.ndarray, int, StepCacheTransform | None]:
    """Image, transformer forwards really run, and the transform (removed again)."""
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    transform = StepCacheTransform(level) if level is not None else None
    if transform is not None:
        transform.apply(pipe)
    try:
        image = pipe.generate({**SETTINGS, **overrides}).images[0]
    finally:
        handle.remove()
        if transform is not None:
            transform.remove(pipe)
    return np.asarray(image), len(calls), transform


def test_a_cache_that_never_skips_leaves_the_image_bit_identical(pipe) -> None:
    plain, forwards, _ = _generate(pipe, None)
    cached, cached_forwards, transform = _generate(pipe, StepCacheLevel("fast", threshold=1e-12, warmup=0.0))
    assert forwards == cached_forwards == 12 and transform.last_report.skipped_steps == []
    assert np.array_equal(plain, cached)
    assert pipe.hooks.owners() == {}  # removed without a trace


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_skipped_steps_run_no_transformer(pipe, batch_cfg: bool) -> None:
    """The tiny random model changes fast (eps ~0.5 per step), so tau 1.0 lets about every other step reuse the
    cache. With the guidance branches one after the other, a skipped step runs neither."""
    pipe.batch_cfg = batch_cfg
    try:
        plain, _, _ = _generate(pipe, None)
        cached, forwards, transform = _generate(pipe, StepCacheLevel("fast", threshold=1.0, warmup=0.25))
    finally:
        pipe.batch_cfg = True
    report = transform.last_report
    per_step = 1 if batch_cfg else 2
    assert report.skipped_steps and all(4 <= s <= 11 for s in report.skipped_steps)  # warm-up 3, last 12 run
    assert forwards == report.forwards == per_step * (12 - len(report.skipped_steps))
    assert report.evaluations == per_step * 12
    assert not np.array_equal(plain, cached)


# -- the `cache` setting -----------------------------------------------------------------------------------------


def test_levels_are_declared_per_model_type() -> None:
    from models.z_image.z_image_handler import ZImageHandler

    base = ZImageHandler().query_model_facts("z_image_base", {})
    turbo = ZImageHandler().query_model_facts("z_image", {})
    assert [lv.name for lv in base.step_cache] == [lv.name for lv in turbo.step_cache] == ["fast", "faster"]
    assert base.step_cache != turbo.step_cache
    assert cache_level(base, "off", "z_image_base") is None and cache_level(base, "fast", "z_image_base") is not None


def test_no_shipped_preset_caches_by_default() -> None:
    """Cached runs are opt-in: every shipped preset (host defaults, family defaults, preset settings merged) prepares
    a task without `cache` to "off"."""
    session = Session()  # the shipped presets; validation only
    defaults = {model_type: session.prepare({"model_type": model_type, "prompt": "x"}).settings["cache"]
                for model_type in session.catalog.presets}
    assert {"z_image", "z_image_base"} <= set(defaults) and set(defaults.values()) == {"off"}


def test_a_model_type_without_levels_refuses_them(tmp_path: Path) -> None:
    session = Session(toy_env(tmp_path))
    assert session.prepare({"model_type": "toy"}).settings["cache"] == "off"  # never the default
    with pytest.raises(SettingsError, match=r"'cache': toy offers no step cache level 'fast' \(choose one of: off\)"):
        session.prepare({"model_type": "toy", "cache": "fast"}, where="task 1")
    with pytest.raises(SettingsError, match="cache"):
        session.prepare({"model_type": "toy", "cache": "fastest"})


def test_cli_cache_flag_reports_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--cache fast on the self-test model: the timing line names the level and the skipped steps, the saved image
    keeps the setting and the report (the tiny model's outputs change too much to skip: none here)."""
    args = ["--ckpts", str(tmp_path / "ckpts"), "--output-dir", str(tmp_path / "out"), "--offline", "--device", "cpu"]
    assert cli.main(["--model", "z_image_selftest", "--prompt", "a fox", "--seed", "2", "--cache", "fast", *args]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "seed 2 |" in ln][0]
    assert line.endswith("| step cache fast: 4/4 forwards, skipped steps none")
    [saved] = (tmp_path / "out").glob("*.png")
    settings = json.loads(Image.open(saved).info["wgp_settings"])
    assert settings["cache"] == "fast"
    assert settings["generation_info"]["step_cache"] == {
        "level": "fast", "steps": 4, "forwards": 4, "evaluations": 4, "skipped_steps": []
    }
