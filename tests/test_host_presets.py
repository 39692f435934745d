"""Presets: shipped defaults load, finetunes add or override field by field, bad files are reported."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from host.presets import PresetError, load_presets
from host.registry import DEFAULT_MODELS_ROOT, discover
from host.session import Session
from tests.fixtures.host_env import TOY_PRESET, toy_env, write_json


def _catalog(tmp_path: Path, finetunes: dict[str, object] | None = None, raw: dict[str, str] | None = None):
    config = toy_env(tmp_path)
    for name, data in (finetunes or {}).items():
        write_json(config.finetunes_dir / f"{name}.json", data)
    for name, text in (raw or {}).items():
        (config.finetunes_dir / f"{name}.json").write_text(text)
    return load_presets(discover(config.models_root), config.defaults_dir, config.finetunes_dir)


def test_shipped_presets_load_and_match_reference() -> None:
    catalog = load_presets(discover(DEFAULT_MODELS_ROOT))
    assert catalog.errors == []
    turbo, base = catalog.get("z_image").settings, catalog.get("z_image_base").settings
    assert (turbo["num_inference_steps"], turbo["guidance_scale"], turbo["flow_shift"]) == (8, 0.0, 3.0)
    assert (base["num_inference_steps"], base["guidance_scale"], base["flow_shift"]) == (30, 4.0, 6.0)
    assert base["negative_prompt"].startswith("low quality, worst quality")
    assert base["resolution"] == turbo["resolution"] == "1024x1024"
    base_def = catalog.get("z_image_base").model_def
    assert base_def["attention"] == {"<89": "sdpa"}
    assert any("int8" in u for u in base_def["URLs"]) and any(u.endswith("_bf16.safetensors") for u in base_def["URLs"])
    # Base reuses Turbo's text encoder list through a preset reference
    assert base_def["text_encoder_URLs"] == catalog.get("z_image").model_def["text_encoder_URLs"]
    assert catalog.get("z_image_selftest").model_def["selftest"] is True


def test_finetune_with_new_id_adds_a_model_type(tmp_path: Path) -> None:
    ft = {"model": {"name": "Mine", "architecture": "toy", "URLs": ["toy/toy_bf16.safetensors"]}, "num_inference_steps": 5}
    catalog = _catalog(tmp_path, {"mine": ft})
    assert catalog.get("mine").settings == {"num_inference_steps": 5}
    assert catalog.get("mine").model_def["toy_extra"] == "default"  # family field from query_model_def


def test_finetune_with_existing_id_overrides_field_by_field(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path, {"toy": {"model": {"name": "Toy v2"}, "num_inference_steps": 7}})
    preset = catalog.get("toy")
    assert preset.name == "Toy v2"
    assert preset.model_def["URLs"] == TOY_PRESET["model"]["URLs"]  # untouched fields stay
    assert preset.model_def["attention"] == {"<89": "sdpa"}
    assert preset.settings["num_inference_steps"] == 7 and preset.settings["prompt"] == "a toy"
    assert [p.name for p in preset.sources] == ["toy.json", "toy.json"]


def test_bad_json_names_file_and_line_and_others_still_load(tmp_path: Path) -> None:
    good = {"model": {"name": "Good", "architecture": "toy", "URLs": ["toy/toy_bf16.safetensors"]}}
    catalog = _catalog(tmp_path, {"good": good}, raw={"broken": '{\n  "model": {\n    "name": "x",,\n  }\n}'})
    assert "good" in catalog.presets and "broken" not in catalog.presets
    [message] = catalog.errors
    assert "broken.json:3:" in message and "bad JSON" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"model": {"name": "x", "architecture": "flux", "URLs": ["a"]}}, r"unknown architecture 'flux' \(known: toy, toy_plus\)"),
        ({"model": {"name": "x", "architecture": "toy", "URLs": ["a"], "vissible": True}}, "unknown key 'vissible'.*'visible'"),
        ({"model": {"name": "x", "architecture": "toy", "URLs": ["a"], "visible": "yes"}}, "model.visible must be bool"),
        ({"model": {"name": "x", "architecture": "toy", "URLs": [1, 2]}}, "model.URLs must be a list of strings"),
        ({"model": {"name": "x", "architecture": "toy", "URLs": "nope"}}, "refers to preset 'nope'"),
        ({"model": {"architecture": "toy", "URLs": ["a"]}}, "lacks 'name'"),
        ({"model": {"name": "x", "architecture": "toy", "URLs": ["a"]}, "num_inference_step": 3}, "did you mean 'num_inference_steps'"),
        ({"model": {"name": "x", "architecture": "toy", "URLs": ["a"]}, "num_inference_steps": "many"}, "num_inference_steps"),
        ({"model": {"name": "x", "architecture": "toy", "URLs": ["a"]}, "quantization": "int4"}, "quantization"),
        ([1, 2], "a JSON object"),
    ],
)
def test_invalid_finetune_is_reported_with_file_and_field(tmp_path: Path, data: object, expected: str) -> None:
    catalog = _catalog(tmp_path, {"bad": data})
    assert "bad" not in catalog.presets and "toy" in catalog.presets
    [message] = catalog.errors
    assert "bad.json" in message
    assert re.search(expected, message), message


def test_one_bad_finetune_does_not_stop_the_others(tmp_path: Path) -> None:
    ok = {"model": {"name": "OK", "architecture": "toy_plus", "URLs": ["toy/toy_bf16.safetensors"]}}
    bad = {"model": {"name": "Bad", "architecture": "toy", "URLs": ["a"]}, "guidance_scale": "high"}
    catalog = _catalog(tmp_path, {"a_bad": bad, "b_ok": ok, "c_ok": ok})
    assert {"b_ok", "c_ok", "toy"} <= set(catalog.presets)
    assert len(catalog.errors) == 1 and "a_bad.json" in catalog.errors[0]


def test_unknown_model_type_suggests_close_id(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    with pytest.raises(PresetError, match="unknown model_type 'tooy'; did you mean 'toy'"):
        catalog.get("tooy")


def test_finetune_pointing_at_local_folder_is_usable(tmp_path: Path) -> None:
    folder = tmp_path / "my_diffusers_model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    config = toy_env(tmp_path)
    write_json(config.finetunes_dir / "local.json", {"model": {"name": "Local", "architecture": "toy", "URLs": [str(folder)]}})
    session = Session(config)
    task = session.prepare({"model_type": "local", "prompt": "hi"})
    assert session.files_for(task) == {"transformer": folder}
    result = session.run(task)
    assert len(result.images) == 1


def test_base_architecture_gets_base_defaults_and_the_preset_still_wins(tmp_path: Path) -> None:
    """Wan2GP's z_image_base.json model block under another id, with no settings: Base's defaults apply."""
    shipped = json.loads((Path(__file__).parents[1] / "defaults" / "z_image_base.json").read_text())
    finetunes = tmp_path / "finetunes"
    write_json(finetunes / "my_base.json", {"model": shipped["model"]})
    write_json(finetunes / "my_base_12.json", {"model": {"name": "Mine", "architecture": "z_image_base"}, "num_inference_steps": 12})
    write_json(finetunes / "my_turbo.json", {"model": {"name": "Mine", "architecture": "z_image"}})
    from host.session import HostConfig

    session = Session(HostConfig(finetunes_dir=finetunes, ckpts=tmp_path / "ckpts", allow_download=False, device="cpu"))
    got = {
        model_type: session.prepare({"model_type": model_type, "prompt": "a fox"}).settings
        for model_type in ("my_base", "my_base_12", "my_turbo", "z_image_base", "z_image")
    }
    keys = ("num_inference_steps", "guidance_scale", "flow_shift")
    base_negative = shipped["negative_prompt"]
    assert [got["my_base"][k] for k in keys] == [30, 4.0, 6.0] and got["my_base"]["negative_prompt"] == base_negative
    assert [got["my_base_12"][k] for k in keys] == [12, 4.0, 6.0] and got["my_base_12"]["negative_prompt"] == base_negative
    assert [got["my_turbo"][k] for k in keys] == [8, 0.0, 3.0] and got["my_turbo"]["negative_prompt"] == ""
    for shipped_id, own in (("z_image_base", "my_base"), ("z_image", "my_turbo")):
        assert {k: got[shipped_id][k] for k in (*keys, "negative_prompt")} == {k: got[own][k] for k in (*keys, "negative_prompt")}
