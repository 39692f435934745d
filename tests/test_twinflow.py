"""TwinFlow few-step sampling (arXiv 2512.05150): its time grid and update rule against values computed by
hand, and the transformer's second (target) timestep."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from common.errors import SettingsError
from common.sampling import denoise_twinflow, twinflow_sigmas
from host.registry import REPO_ROOT
from host.session import HostConfig, Session
from models.z_image.pipeline_z_image import twinflow_model_time
from models.z_image.settings_z_image import GenerationSettings
from models.z_image.tiny_z_image import TINY_CONFIG
from models.z_image.transformer_z_image import ZImageTransformer
from tests.fixtures.pipelines import flat_pipeline

# t_i = 1 - linspace(0.001, 1 - end_gap, N)_i, then 0; end_gap 0.6 for 1-2 steps, 0.5 for 3-4 (by hand):
HAND_GRIDS = {
    1: [0.999, 0.0],  # linspace with one point is its start
    2: [0.999, 0.6, 0.0],  # linspace(0.001, 0.4, 2) = [0.001, 0.4]
    3: [0.999, 0.7495, 0.5, 0.0],  # linspace(0.001, 0.5, 3) = [0.001, 0.2505, 0.5]
    4: [0.999, 1 - (0.001 + 0.499 / 3), 1 - (0.001 + 2 * 0.499 / 3), 0.5, 0.0],  # step 0.499 / 3
}


@pytest.mark.parametrize("steps", sorted(HAND_GRIDS))
def test_grid_matches_the_hand_computed_values(steps: int) -> None:
    grid = twinflow_sigmas(steps)
    assert grid.dtype == torch.float32 and len(grid) == steps + 1
    assert grid.tolist() == pytest.approx(HAND_GRIDS[steps], abs=1e-7)


@pytest.mark.parametrize("steps", [0, 5, 8])
def test_grid_refuses_other_step_counts(steps: int) -> None:
    with pytest.raises(ValueError, match="1 to 4 steps"):
        twinflow_sigmas(steps)


def test_update_rule_by_hand() -> None:
    """velocity 2 everywhere, noise 0.5 everywhere, x = 1 at t = 0.999, 2 steps (grid 0.999 -> 0.6 -> 0):
    step 1: x0 = 1 - 0.999 * 2 = -0.998; x = (1 - 0.6) * -0.998 + 0.6 * 0.5 = -0.0992
    step 2: x0 = -0.0992 - 0.6 * 2 = -1.2992; t_next = 0, so x = x0 = -1.2992 (no noise drawn)."""
    calls: list[tuple[float, int]] = []
    draws: list[torch.Size] = []

    def velocity(x: torch.Tensor, t: float, step: int) -> torch.Tensor:
        calls.append((t, step))
        return torch.full_like(x, 2.0)

    def noise(shape: torch.Size) -> torch.Tensor:
        draws.append(shape)
        return torch.full(shape, 0.5)

    seen: list[float] = []
    out = denoise_twinflow(torch.ones(1, 1, 1, 1), twinflow_sigmas(2), velocity, noise, lambda s, x: seen.append(x.item()))
    assert seen == pytest.approx([-0.0992, -1.2992], abs=1e-6)
    assert out.item() == pytest.approx(-1.2992, abs=1e-6)
    assert [step for _, step in calls] == [0, 1] and calls[0][0] == pytest.approx(0.999) and calls[1][0] == pytest.approx(0.6)
    assert len(draws) == 1  # N steps = N velocity calls; fresh noise before every step but the last


def test_after_step_edits_the_latents_between_steps() -> None:
    out = denoise_twinflow(
        torch.ones(1, 1, 1, 1), twinflow_sigmas(2), lambda x, t, s: torch.zeros_like(x), lambda shape: torch.zeros(shape),
        after_step=lambda step, x: x + 10.0,
    )
    # v = 0: x0 = x. step 1: 0.4 * 1 + 0 + 10 = 10.4; step 2: x0 = 10.4, + 10 = 20.4
    assert out.item() == pytest.approx(20.4)


@pytest.fixture(scope="module")
def model() -> ZImageTransformer:
    torch.manual_seed(0)
    m = ZImageTransformer(TINY_CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@torch.no_grad()
def test_target_time_embedding_is_the_scaled_gap_embedding(model: ZImageTransformer) -> None:
    t, target = torch.tensor([0.25, 0.9]), torch.tensor([1.0, 0.0])
    got = model.target_time_embedding(t, target)
    # by hand: gaps 0.75 and -0.9 -> t_embedder(750) * 0.75 and t_embedder(-900) * 0.9
    expected = torch.cat([model.t_embedder(torch.tensor([750.0])) * 0.75, model.t_embedder(torch.tensor([-900.0])) * 0.9])
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)  # fp32 rounding of 0.9 * 1000 in the sinusoid
    assert math.isclose(float(model.target_time_embedding(t, t).abs().max()), 0.0)  # no gap, no change


@torch.no_grad()
def test_target_timestep_reaches_the_output_only_when_given(model: ZImageTransformer) -> None:
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([0.4])
    caps = [torch.randn(9, TINY_CONFIG.cap_feat_dim, generator=gen)]
    plain = model(x, t, caps)
    assert torch.equal(model(x, t, caps, t_target=t.clone()), plain)  # gap 0 adds exactly 0
    moved = model(x, t, caps, t_target=torch.tensor([0.0]))
    assert float((moved - plain).abs().mean()) > 1e-3 * float(plain.abs().mean())


# -- through the pipeline, the settings and Wan2GP's preset -----------------------------------------

# deepbeepmeep/Wan2GP defaults/z_image_twinflow_turbo.json (commit 42c40fe8), byte for byte.
WAN2GP_PRESET = """{
    "model": {
        "name": "TwinFlow Z-Image Turbo",
        "architecture": "z_image",
        "description": "TwinFlow is a distilled Z-Image Turbo Finetune optimized for 1 to 4 steps Image Generations.",
        "unified_solver": true,
        "URLs": [
            "https://huggingface.co/DeepBeepMeep/Z-Image/TwinFlow-Z-Image-Turbo_bf16.safetensors",
            "https://huggingface.co/DeepBeepMeep/Z-Image/TwinFlow-Z-Image-Turbo_quanto_bf16_int8.safetensors"
        ]
    },
    "resolution": "1024x1024",
    "batch_size": 1,
    "num_inference_steps": 2,
    "guidance_scale": 0
}
"""
BASE = dict(prompt="a photo of a cat sitting on a red chair", width=64, height=64, seed=3)


@pytest.fixture(scope="module")
def pipe(tiny_flat_layout: dict[str, Path]) -> Any:
    return flat_pipeline(tiny_flat_layout)


def test_pipeline_runs_the_grid_with_the_target_timestep(pipe: Any) -> None:
    calls: list[tuple[list[float], list[float] | None]] = []

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        target = kwargs.get("t_target")
        calls.append((args[1].tolist(), None if target is None else target.tolist()))

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        first = pipe.generate({**BASE, "num_inference_steps": 2, "sample_solver": "twinflow"}).images[0]
    finally:
        hook.remove()
    # 2 steps = 2 calls at t = 1 - grid = 0.001, 0.4, each asking for the jump to the clean end: the target 0
    # reaches the model as 0 (sign(0) * (1 - 0), TwinFlow's conversion)
    assert [t for t, _ in calls] == [pytest.approx([0.001], abs=1e-6), pytest.approx([0.4], abs=1e-6)]
    assert [target for _, target in calls] == [[0.0], [0.0]]
    again = pipe.generate({**BASE, "num_inference_steps": 2, "sample_solver": "unified"}).images[0]  # Wan2GP's name
    assert again.tobytes() == first.tobytes()  # the step noise is seeded: same seed, same image
    other = pipe.generate({**BASE, "num_inference_steps": 2, "sample_solver": "twinflow", "seed": 4}).images[0]
    euler = pipe.generate({**BASE, "num_inference_steps": 2}).images[0]
    assert other.tobytes() != first.tobytes() and euler.tobytes() != first.tobytes()


def test_twinflow_model_time_conversion() -> None:
    assert twinflow_model_time(0.999) == pytest.approx(0.001)
    assert twinflow_model_time(0.0) == 0.0  # sign(0) = 0: the clean-end target
    assert twinflow_model_time(-0.25) == pytest.approx(-0.75)  # TwinFlow's negative (fake-trajectory) times


def test_twinflow_step_count_is_checked_with_the_fix() -> None:
    with pytest.raises(SettingsError, match="twinflow takes 1 to 4 steps.*use sample_solver 'default'"):
        GenerationSettings.from_dict({"prompt": "a cat", "sample_solver": "twinflow", "num_inference_steps": 8})
    unified = GenerationSettings.from_dict({"prompt": "a cat", "sample_solver": "unified", "num_inference_steps": 4})
    assert unified.sample_solver == "twinflow"


def test_wan2gp_twinflow_preset_loads_unchanged_and_picks_the_sampler(tmp_path: Path) -> None:
    defaults = tmp_path / "defaults"
    defaults.mkdir()
    (defaults / "z_image_twinflow_turbo.json").write_text(WAN2GP_PRESET)
    session = Session(HostConfig(defaults_dir=defaults, finetunes_dir=None, ckpts=tmp_path / "ckpts", allow_download=False, device="cpu"))
    assert session.catalog.errors == []
    preset = session.catalog.get("z_image_twinflow_turbo")
    assert preset.model_def["unified_solver"] is True
    settings = session.prepare({"model_type": "z_image_twinflow_turbo", "prompt": "a fox"}).settings
    assert (settings["sample_solver"], settings["num_inference_steps"], settings["guidance_scale"]) == ("twinflow", 2, 0.0)
    # the shipped preset is Wan2GP's, with one more sentence in its description
    shipped = json.loads((REPO_ROOT / "defaults" / "z_image_twinflow_turbo.json").read_text())
    wan2gp = json.loads(WAN2GP_PRESET)
    assert shipped["model"].pop("description").startswith(wan2gp["model"].pop("description"))
    assert shipped == wan2gp


def test_unified_solver_must_be_a_switch(tmp_path: Path) -> None:
    defaults = tmp_path / "defaults"
    defaults.mkdir()
    (defaults / "tf.json").write_text(WAN2GP_PRESET.replace('"unified_solver": true', '"unified_solver": "yes"'))
    session = Session(HostConfig(defaults_dir=defaults, finetunes_dir=None, ckpts=tmp_path / "ckpts", allow_download=False, device="cpu"))
    [error] = session.catalog.errors
    assert "tf.json" in error and "model.unified_solver must be true or false" in error


def test_image_to_image_runs_on_the_twinflow_grid(pipe: Any) -> None:
    """Strength 0.5 of 4 TwinFlow steps keeps the last 2 of the grid (0.999, 0.8327, 0.6663, 0.5, 0): the model is
    asked at t = 1 - 0.6663 and 1 - 0.5, each time for the clean end."""
    from PIL import Image

    calls: list[tuple[float, float]] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((float(args[1][0]), float(kwargs["t_target"][0]))), with_kwargs=True
    )
    start = Image.new("RGB", (64, 64), (200, 40, 40))
    try:
        pipe.generate({**BASE, "num_inference_steps": 4, "sample_solver": "twinflow", "image_start": start, "denoising_strength": 0.5})
    finally:
        hook.remove()
    assert calls == [(pytest.approx(1 - 0.6663333, abs=1e-6), 0.0), (pytest.approx(0.5, abs=1e-6), 0.0)]
