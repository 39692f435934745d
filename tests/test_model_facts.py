"""Model facts come from the family (`query_model_facts`): the planner, the preview, int8 and offload read
them, and a family with other numbers (the toy) gets its own results with no host change."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from common.model_facts import DECODER, DENOISER, TEXT_ENCODER, ComponentFacts, LatentFormat, ModelFacts
from host.lowvram import cli as lowvram_cli
from host.lowvram import planner
from host.session import Session
from host.web.models import memory_plan, out_of_memory_advice
from host.web.preview import latents_to_rgb
from host.web.queue import DONE, GenerationWorker, wait_until_idle
from tests.fixtures.host_env import TOY_PRESET, toy_env

TOY_PLUS_PRESET = {**TOY_PRESET, "model": {**TOY_PRESET["model"], "name": "Toy plus", "architecture": "toy_plus"}}


def _toy_session(tmp_path: Path) -> Session:
    return Session(toy_env(tmp_path, presets={"plus": TOY_PLUS_PRESET}))


# -- the facts reach the preset ----------------------------------------------------------------------


def test_presets_carry_their_family_facts(tmp_path: Path) -> None:
    from models.z_image.z_image_handler import family_handler

    catalog = _toy_session(tmp_path).catalog
    toy = catalog.get("toy").facts
    assert toy.names == ("prompt_encoder", "backbone", "pixel_decoder")  # run order = offload order
    assert toy.int8_components == ("prompt_encoder", "backbone")
    assert toy.quantizes("backbone", "blocks.3.attn.q") and not toy.quantizes("backbone", "embed.proj")
    assert toy.quantizes("prompt_encoder", "blocks.0.mlp.fc1") and not toy.quantizes("prompt_encoder", "blocks.0.attn.q")
    assert toy.quantize_pattern("pixel_decoder") is None and not toy.quantizes("pixel_decoder", "blocks.0.x")
    plus = catalog.get("plus").facts
    assert plus.latent is None and plus.int8_components == () and plus.names == ("backbone",)
    z_image = Session().catalog.get("z_image").facts  # the shipped preset, answered by the Z-Image handler
    assert z_image is family_handler.query_model_facts("z_image", {})
    assert z_image.names == ("text_encoder", "transformer", "vae")
    assert z_image.int8_components == ("text_encoder", "transformer")
    assert z_image.component("transformer").params == 6_154_908_736 and z_image.latent.channels == 16


def test_a_family_answering_something_else_is_named(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    handler = config.models_root / "toy" / "toy_handler.py"
    source = handler.read_text()
    marker = "        return TOY_PLUS_FACTS if model_type == \"toy_plus\" else TOY_FACTS\n"
    assert marker in source
    handler.write_text(source.replace(marker, "        return {'channels': 4}\n"))
    catalog = Session(config).catalog
    assert "toy" not in catalog.presets
    assert "query_model_facts('toy') with dict; it must return common.model_facts.ModelFacts" in catalog.skipped["toy"]


def test_facts_are_checked_when_a_family_builds_them() -> None:
    with pytest.raises(ValueError, match="rgb_factors must be 4 rows"):
        LatentFormat(channels=4, pixels_per_latent=8, rgb_factors=((0.1, 0.2, 0.3),))
    with pytest.raises(ValueError, match="int8_params 5 > params 4"):
        ComponentFacts("transformer", DENOISER, params=4, int8_params=5)
    with pytest.raises(ValueError, match="not a regex"):
        ComponentFacts("transformer", DENOISER, int8_pattern="layers.(")
    with pytest.raises(ValueError, match="role 'unet'"):
        ComponentFacts("transformer", "unet")
    with pytest.raises(ValueError, match="more than one denoiser"):
        ModelFacts((ComponentFacts("a", DENOISER), ComponentFacts("b", DENOISER)))
    with pytest.raises(KeyError, match="no component 'vae'.*has a"):
        ModelFacts((ComponentFacts("a", DENOISER),)).component("vae")


# -- planner -----------------------------------------------------------------------------------------


def test_planner_sizes_of_the_toy_family_come_from_its_facts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    session = _toy_session(tmp_path)
    toy = session.catalog.get("toy")
    sizes = planner.sizes_from_facts(toy.facts)
    assert sizes == planner.ModelSizes(
        planner.PartSize(3_000_000_000, 2_000_000_000),
        planner.PartSize(1_000_000_000, 600_000_000),
        40_000_000,
        dim=2048,
        ffn_hidden=8192,
        text_hidden=1024,
        patch=1,
        vae_scale=4,
        token_multiple=8,
        vae_bytes_per_pixel=1000,
    )
    plans = {(p.quantization, p.profile): p for p in planner.plan_table(sizes, 64, 64, cfg=False, vram_gb=5)}
    # By hand, 64x64, no CFG, caption 512: tokens (64/4)^2 + 512 = 768; transformer activations
    # 768 * (10 * 2048 + 3 * 8192) * 2 bytes = 69,206,016. bf16 profile 1: 6e9 weights + that = 6.069 GB
    # (the largest phase) + 0.6 context = 6.67 GB; RAM 6e9 + 2e9 + 0.16e9 (VAE fp32) + 2 runtime = 10.16 GB.
    # int8: 2e9 * 1 + 1e9 * 2 = 4e9 transformer bytes -> 4.67 GB VRAM; text 0.6e9 + 0.4e9 * 2 = 1.4e9 -> RAM 7.56.
    assert (plans[("bf16", 1)].vram_gb, plans[("bf16", 1)].ram_gb, plans[("bf16", 1)].fits) == (6.67, 10.16, False)
    assert (plans[("int8", 1)].vram_gb, plans[("int8", 1)].ram_gb, plans[("int8", 1)].fits) == (4.67, 7.56, True)
    table = memory_plan(toy, {"resolution": "64x64", "guidance_scale": 0}, vram_gb=5)
    assert "toy 64x64, CFG off" in table and "6.67" in table and "10.16" in table
    assert lowvram_cli.plan_command(session, argparse.Namespace(model="toy", resolution="64x64", guidance=None, vram_gb=5)) == 0
    assert "4.67" in capsys.readouterr().out


def test_a_family_without_sizes_gets_no_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    session = _toy_session(tmp_path)
    plus = session.catalog.get("plus")
    assert planner.sizes_from_facts(plus.facts) is None
    assert memory_plan(plus, {"resolution": "64x64"}, vram_gb=5) == ""
    assert out_of_memory_advice(plus, {"resolution": "64x64"}).startswith("Out of memory: lower the resolution")
    args = argparse.Namespace(model="plus", resolution="64x64", guidance=None, vram_gb=5)
    assert lowvram_cli.plan_command(session, args) == lowvram_cli.EXIT_FAILED
    assert "'toy_plus' family gives no sizes to plan with" in capsys.readouterr().err


def test_planner_tiling_threshold_follows_the_vae_scale() -> None:
    """Tiles above 128 latent pixels per side, of 64 latent pixels: 1024 / 512 px at scale 8, 512 / 256 at 4."""
    facts = ModelFacts(
        (
            ComponentFacts("t", TEXT_ENCODER),
            ComponentFacts("d", DENOISER, 10, hidden=1, ffn_hidden=1),
            ComponentFacts("v", DECODER, 1),
        ),
        latent=LatentFormat(4, 4),
        decode_bytes_per_pixel=1000,
    )
    sizes = planner.sizes_from_facts(facts)
    assert planner.vae_decode_bytes(sizes, 512, 512) == 512 * 512 * 1000  # not above 128 * 4: whole image
    assert planner.vae_decode_bytes(sizes, 520, 520) == 256 * 256 * 1000  # one 256 x 256 tile


# -- preview -----------------------------------------------------------------------------------------


def test_toy_family_preview_uses_its_own_latent_format(tmp_path: Path) -> None:
    session = _toy_session(tmp_path)
    worker = GenerationWorker(session)
    job = worker.submit(session.prepare({"model_type": "toy", "prompt": "PREVIEW", "resolution": "32x32"}, "test"))
    assert wait_until_idle(worker, 20)
    snap = worker.snapshot()
    assert snap.finished[-1].id == job.id and snap.finished[-1].state == DONE
    # (1, 4, 8, 8) latents of (0.8, 0.4, 0.2, 0.4) through the toy's map + bias = RGB (0.6, 0.2, 0.2) in
    # [-1, 1] -> (204, 153, 153); shown 4x (its pixels_per_latent), so 32 x 32.
    assert snap.preview is not None and snap.preview.size == (32, 32)
    assert snap.preview.getpixel((16, 16)) == (204, 153, 153)
    toy_format = session.catalog.get("toy").facts.latent
    assert latents_to_rgb(torch.zeros(1, 16, 8, 8), toy_format) is None  # Z-Image-shaped latents: not this map

    worker.submit(session.prepare({"model_type": "plus", "prompt": "PREVIEW", "resolution": "32x32"}, "test"))
    assert wait_until_idle(worker, 20)
    after = worker.snapshot()
    assert after.finished[-1].state == DONE and after.preview_version == snap.preview_version  # no format: none
