"""The web UI's logic without a browser: sizes, form <-> settings, saved defaults, settings read back from
images, the model facts the page shows, the latent preview and the HTML pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

from common.errors import SettingsError
from common.model_facts import LatentFormat
from common.sampling import get_sigmas
from host.outputs import save_image
from host.session import Session
from host.web.form import (
    CUSTOM,
    RESOLUTION_GROUPS,
    accepted_keys,
    form_fields,
    form_from_settings,
    load_user_defaults,
    parse_a1111,
    preset_defaults,
    resolution_choices,
    resolution_value,
    save_user_defaults,
    settings_from_form,
    settings_from_image,
    snap_size,
)
from host.web.models import (
    activity_note,
    count_tokens,
    files_report,
    memory_plan,
    model_choices,
    models_of_family,
    out_of_memory_advice,
)
from host.web.preview import LatentPreviewer, latents_to_rgb, preview_interval
from host.web.render import status_html
from tests.fixtures.host_env import toy_env, write_json

# -- sizes ----------------------------------------------------------------------------------------


def test_resolution_presets_are_multiples_of_16_and_include_the_usual_sizes() -> None:
    sizes = [size for _, group in RESOLUTION_GROUPS for size in group]
    for size in sizes:
        width, height = (int(v) for v in size.split("x"))
        assert width % 16 == 0 and height % 16 == 0, size
    for wanted in ("1024x1024", "1024x768", "768x1024", "1280x768", "1920x1088", "2048x2048"):
        assert wanted in sizes
    choices = resolution_choices(["64x64", "1024x1024"])
    assert ("preset · 64x64", "64x64") in choices and choices[-1][1] == CUSTOM
    assert sum(1 for _, value in choices if value == "1024x1024") == 1
    assert resolution_value(1024, 768, choices) == "1024x768" and resolution_value(1000, 768, choices) == CUSTOM


def test_custom_sizes_snap_to_16_with_a_note_and_out_of_range_sizes_are_left_for_validation() -> None:
    assert snap_size(1000, 767) == (1008, 768, "snapped to multiples of 16: width 1000 -> 1008, height 767 -> 768")
    assert snap_size(1024, 768) == (1024, 768, "")
    assert snap_size(5000, 8)[:2] == (5000, 8)  # the family's validation names the range


# -- form <-> settings ----------------------------------------------------------------------------


def _form(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "model": "toy",
        "prompt": "a toy",
        "negative_prompt": "",
        "width": 100,
        "height": 32,
        "steps": 3.0,
        "guidance": 0,
        "flow_shift": 1,
        "seed": -1.0,
        "batch_size": 2,
        "cfg_normalization": 0,
        "cfg_truncation": 1,
        "max_tokens": 512,
        "quantization": "bf16",
        "profile": "4",
        "attention": "auto",
        "output_format": "png",
        "loras": None,
        "loras_multipliers": "",
    }
    return values | overrides


def test_form_to_settings_keeps_only_accepted_keys_and_normalises_types() -> None:
    accepted = {"prompt", "negative_prompt", "resolution", "num_inference_steps", "guidance_scale", "seed"}
    accepted |= {"batch_size", "quantization", "profile", "activated_loras", "loras_multipliers"}
    fields = form_fields(Session().registry)  # the shipped families' settings and the host's
    result = settings_from_form(_form(), fields, accepted)
    assert result.settings == {
        "resolution": "96x32",
        "prompt": "a toy",
        "negative_prompt": "",
        "num_inference_steps": 3,
        "guidance_scale": 0.0,
        "seed": -1,
        "batch_size": 2,
        "quantization": "bf16",
        "profile": 4,
        "activated_loras": [],
        "loras_multipliers": "",
    }
    assert result.notes == ["snapped to multiples of 16: width 100 -> 96"]
    assert isinstance(result.settings["num_inference_steps"], int)


def test_settings_to_form_round_trip() -> None:
    settings = {"model_type": "toy", "prompt": "p", "resolution": "64x48", "num_inference_steps": 5, "profile": 2}
    settings |= {"cfg_normalization": True, "activated_loras": ["a.safetensors"], "unknown": 1}
    fields = form_fields(Session().registry)
    values = form_from_settings(settings, fields)
    assert values == {
        "model": "toy",
        "prompt": "p",
        "width": 64,
        "height": 48,
        "steps": 5,
        "profile": "2",
        "cfg_normalization": 1.0,
        "loras": ["a.safetensors"],
    }
    assert set(values) <= {field.id for field in fields}


def test_user_defaults_override_the_preset_and_unknown_keys_are_ignored(tmp_path: Path) -> None:
    session = Session(toy_env(tmp_path))
    preset = session.catalog.get("toy")
    settings_dir = tmp_path / "settings"
    assert preset_defaults(session, preset, settings_dir)["num_inference_steps"] == 3
    save_user_defaults(settings_dir, "toy", {"model_type": "toy", "num_inference_steps": 9, "bogus": 1})
    assert load_user_defaults(settings_dir, "toy") == {"num_inference_steps": 9, "bogus": 1}
    defaults = preset_defaults(session, preset, settings_dir)
    assert defaults["num_inference_steps"] == 9 and "bogus" not in defaults and defaults["model_type"] == "toy"
    assert defaults["output_format"] == "png"  # the host's own defaults are there too
    assert "resolution" in accepted_keys(session, preset) and "cfg_truncation" not in accepted_keys(session, preset)
    (settings_dir / "toy.json").write_text("{broken")
    assert load_user_defaults(settings_dir, "toy") == {}


# -- settings from images -------------------------------------------------------------------------


def test_a1111_parameters_are_parsed() -> None:
    text = "a lighthouse, at dusk\nsecond line\nNegative prompt: fog, rain\nSteps: 7, Sampler: Euler, CFG scale: 2.5, "
    text += 'Seed: 77, Size: 96x80, Model: z_image, Lora: "a:1, b:2", Shift: 3'
    assert parse_a1111(text) == {
        "prompt": "a lighthouse, at dusk\nsecond line",
        "negative_prompt": "fog, rain",
        "num_inference_steps": 7,
        "guidance_scale": 2.5,
        "seed": 77,
        "resolution": "96x80",
        "model_type": "z_image",
        "flow_shift": 3.0,
    }
    assert parse_a1111("just a prompt") == {"prompt": "just a prompt"}


def test_settings_from_our_image_from_an_a1111_image_and_from_a_bare_image(tmp_path: Path) -> None:
    settings = {"model_type": "toy", "prompt": "p", "seed": 5, "resolution": "16x16"}
    ours = save_image(Image.new("RGB", (16, 16)), tmp_path, "ours.png", settings, {"program": "x"})
    found = settings_from_image(ours)
    assert found.source == "embedded settings" and found.settings["seed"] == 5
    jpeg = save_image(Image.new("RGB", (16, 16)), tmp_path, "ours.jpg", settings, {}, "jpeg")
    assert settings_from_image(jpeg).settings["prompt"] == "p"
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 3, Seed: 9, Size: 32x16")
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=meta)
    found = settings_from_image(tmp_path / "a1111.png")
    assert found.source == "A1111 parameters" and found.settings == {
        "prompt": "a cat",
        "num_inference_steps": 3,
        "seed": 9,
        "resolution": "32x16",
    }
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    with pytest.raises(SettingsError, match="no generation settings"):
        settings_from_image(tmp_path / "bare.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(SettingsError, match="not a readable image"):
        settings_from_image(tmp_path / "not_an_image.png")


# -- model facts ----------------------------------------------------------------------------------


def test_model_choices_group_by_family_and_mark_finetunes(tmp_path: Path) -> None:
    config = toy_env(tmp_path, presets={"toy_plus": {"model": {"name": "Toy plus", "architecture": "toy_plus"}}})
    write_json(
        config.finetunes_dir / "toy_mine.json", {"model": {"name": "Mine", "architecture": "toy", "URLs": "toy"}}
    )
    write_json(
        config.finetunes_dir / "toy_hidden.json", {"model": {"name": "H", "architecture": "toy", "visible": False}}
    )
    choices = model_choices(Session(config))
    assert [(c.model_type, c.family) for c in choices] == [
        ("toy", "Toy family"),
        ("toy_mine", "Toy family"),
        ("toy_plus", "Toy family"),
    ]
    assert models_of_family(choices, "Toy family")[1] == ("Mine (finetune)", "toy_mine")


def test_files_report_names_missing_files_and_where_to_put_them(tmp_path: Path) -> None:
    session = Session(toy_env(tmp_path, files=False))
    report = files_report(session, session.catalog.get("toy"), "int8")
    assert not report.ready
    assert "missing" in report.text and "toy_quanto_bf16_int8.safetensors" in report.text
    assert f"put it at: {tmp_path / 'ckpts' / 'toy'}" in report.text and "<details open>" in report.text
    session.config.allow_download = True
    assert "downloaded on the first generation" in files_report(session, session.catalog.get("toy"), "int8").text
    ready = Session(toy_env(tmp_path / "with_files"))
    assert files_report(ready, ready.catalog.get("toy"), "bf16").ready


def test_negative_prompt_acts_only_with_guidance_or_nag() -> None:
    """The rule is Z-Image's own declaration (its negative_prompt spec's active_when), not a name in host/."""
    from models.z_image.settings_z_image import SPECS

    spec = SPECS["negative_prompt"]
    off = activity_note(spec, {"guidance_scale": 0.0, "NAG_scale": 1.0})
    assert off[0] is False and "no effect" in off[1] and "NAG_scale above 1" in off[1]
    assert activity_note(spec, {"guidance_scale": None})[0] is False
    assert activity_note(spec, {"guidance_scale": 4.0, "NAG_scale": 1.0}) == (True, "Negative prompt (active: guidance_scale > 0)")
    assert activity_note(spec, {"guidance_scale": 0, "NAG_scale": 3}) == (True, "Negative prompt (active: NAG_scale > 1)")
    assert activity_note(SPECS["prompt"], {}) == (True, "Prompt")  # no rule: always active


def test_token_count_exact_with_the_tokenizer_and_estimated_without(tiny_flat_layout: dict[str, Path]) -> None:
    folder = tiny_flat_layout["tokenizer"]
    folder = folder if folder.is_dir() else folder.parent
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "a photo of a cat sitting on a red chair"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    exact = count_tokens(prompt, folder, 512)
    assert exact.exact and exact.tokens == len(tokenizer(text).input_ids) > len(tokenizer(prompt).input_ids)
    long = count_tokens(prompt * 20, folder, 16)
    assert long.truncated and "cut off" in long.markdown()
    guess = count_tokens("x" * 400, None, 512)
    assert not guess.exact and "estimate" in guess.markdown() and 90 < guess.tokens < 120


def test_memory_plan_and_out_of_memory_advice_for_the_shipped_presets() -> None:
    session = Session()
    base = session.catalog.get("z_image_base")
    table = memory_plan(base, {"resolution": "1024x1024", "guidance_scale": 4.0}, vram_gb=12)
    assert "CFG on" in table and "profile" in table and "yes" in table
    assert memory_plan(session.catalog.get("z_image_selftest"), {"resolution": "64x64"}) == ""
    assert out_of_memory_advice(base, {"resolution": "1024x1024"}).startswith("Out of memory")


# -- preview --------------------------------------------------------------------------------------


def _z_image_latent() -> LatentFormat:  # the Z-Image family's latent format, as its handler answers it
    from models.z_image.z_image_handler import family_handler

    return family_handler.query_model_facts("z_image", {}).latent


def test_latents_to_rgb_uses_the_fixed_flux_map() -> None:
    fmt = _z_image_latent()
    image = latents_to_rgb(torch.zeros(2, 16, 8, 6), fmt)
    assert image is not None and image.size == (48, 64)  # 8x the latent size
    expected = tuple(round((b + 1) * 127.5) for b in fmt.rgb_bias)  # zero latents -> the bias colour
    assert expected == (123, 118, 117)  # the published bias (-0.0329, -0.0718, -0.0851)
    assert image.getpixel((10, 10)) == expected
    # Non-zero latents, one latent pixel at a time (a 512-tall latent is shown at scale 1: no resampling).
    # Channel 4 = 1 and channel 12 = -0.5 at (x 1, y 0): rgb = bias + row 4 - 0.5 * row 12 of the Flux map =
    # (-0.0329 + 0.0859 - 0.04085, -0.0718 + 0.0721 - 0.03825, -0.0851 + 0.0329 - 0.03745)
    # = (0.01215, -0.03795, -0.08965) -> (v + 1) * 127.5 = (129.05, 122.66, 116.07) -> (129, 123, 116).
    latents = torch.zeros(1, 16, 512, 4)
    latents[0, 4, 0, 1], latents[0, 12, 0, 1] = 1.0, -0.5
    latents[0, 13, 3, 2] = -40.0  # row 13 = (-0.1264, -0.0522, -0.1103): (5.06, 2.09, 4.41) + bias, all > 1
    shown = latents_to_rgb(latents, fmt)
    assert shown is not None and shown.size == (4, 512)
    assert shown.getpixel((1, 0)) == (129, 123, 116) and shown.getpixel((0, 0)) == expected
    assert shown.getpixel((2, 3)) == (255, 255, 255)  # clamped to 1 before the conversion to 8 bits
    assert latents_to_rgb(torch.zeros(1, 4, 8, 8), fmt) is None  # no map known for 4 channels
    assert latents_to_rgb(torch.zeros(1, 16, 8, 8), None) is None  # a family without a latent format
    big = latents_to_rgb(torch.randn(1, 16, 256, 128), fmt)
    assert big is not None and max(big.size) == 512


def test_previewer_recovers_the_clean_image_estimate_from_two_steps() -> None:
    sigmas = get_sigmas(4, 3.0).tolist()
    x0, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    at = [(1 - s) * x0 + s * noise for s in sigmas]  # straight flow path: constant velocity noise - x0
    fmt = _z_image_latent()
    previewer = LatentPreviewer(sigmas, fmt)
    previewer.observe(1, at[1])
    estimate = previewer.image(2, at[2])
    assert estimate is not None and estimate.tobytes() == latents_to_rgb(x0, fmt).tobytes()
    assert LatentPreviewer(None, fmt).image(1, at[1]).tobytes() == latents_to_rgb(at[1], fmt).tobytes()
    assert preview_interval(8) == 1 and preview_interval(30) == 3 and preview_interval(1000) == 100


def test_status_html_escapes_user_text() -> None:
    html = status_html("<script>alert(1)</script>", "error")
    assert "<script>" not in html and "wgp-error" in html
    assert ">&lt;script&gt;alert(1)&lt;/script&gt;</div>" in html  # the text itself, escaped, is shown
    quotes = status_html("""say "hi" & 'bye'""")
    assert "say &quot;hi&quot; &amp; &#x27;bye&#x27;" in quotes and 'data-level="info"' in quotes


def test_launch_serves_on_localhost_unless_listen_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from host import web
    from host.cli import build_parser

    served: list[tuple[str, int, bool]] = []
    monkeypatch.setattr(web, "build_app", lambda session, settings_dir: object())
    monkeypatch.setattr(web, "serve", lambda demo, session, host, port, share=False: served.append((host, port, share)))
    assert web.launch(build_parser().parse_args([])) == 0
    assert served[-1] == ("127.0.0.1", 7860, False) and "WARNING" not in capsys.readouterr().out
    assert web.launch(build_parser().parse_args(["--listen", "--server-port", "7999"])) == 0
    assert served[-1] == ("0.0.0.0", 7999, False) and "WARNING: --listen" in capsys.readouterr().out
