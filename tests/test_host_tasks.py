"""Task validation: merge order, host and family checks, task files (JSON and saved images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import CheckpointError, SettingsError, UserInputError
from host.presets import PresetError
from host.session import Session
from host.tasks import prepare_tasks, read_task_file
from tests.fixtures.host_env import toy_env, write_json


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(toy_env(tmp_path))


def test_task_is_merged_over_family_and_preset_defaults(session: Session) -> None:
    task = session.prepare({"model_type": "toy", "guidance_scale": 2.5})
    s = task.settings
    assert s["model_type"] == "toy"
    assert s["guidance_scale"] == 2.5  # task
    assert s["prompt"] == "a toy" and s["resolution"] == "32x32"  # preset
    assert s["flow_shift"] == 1.0  # family fallback
    assert (s["output_format"], s["quantization"], s["attention"], s["seed"]) == ("png", "int8", "auto", -1)  # host
    assert list(s)[0] == "model_type"


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ({"model_type": "toy", "promt": "x"}, "unknown setting 'promt'; did you mean 'prompt'"),
        ({"model_type": "toy", "resolution": "33x32"}, "multiples of 16"),
        ({"model_type": "toy", "resolution": "big"}, "resolution must look like"),
        ({"model_type": "toy", "num_inference_steps": "8"}, "'num_inference_steps' must be an integer"),
        ({"model_type": "toy", "output_format": "gif"}, "'output_format' must be png, jpeg or webp"),
        ({"model_type": "toy", "quantization": 8}, "'quantization' must be str"),
        ({"model_type": "toy", "activated_loras": "a.safetensors"}, "'activated_loras' must be list"),
        ({"model_type": "toy", "loras_multipliers": "0.5"}, "loras_multipliers has 1 values for 0 LoRA"),
        ({"model_type": "toy", "lset": "nope"}, "LoRA set 'nope' not found in"),
        ({"prompt": "no model"}, "'model_type' is required \\(one of: toy\\)"),
        (["not", "a", "dict"], "a task is a JSON object"),
    ],
)
def test_bad_tasks_say_what_and_where(session: Session, task: object, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected) as info:
        session.prepare(task, "tasks.json[3]")  # type: ignore[arg-type]
    assert str(info.value).startswith("tasks.json[3]")


@pytest.mark.parametrize(
    ("loras", "expected"),
    [
        (["nope.safetensors"], "activated_loras: LoRA 'nope.safetensors' not found in"),
        (["old.ckpt"], "activated_loras: old.ckpt: .ckpt is a pickle format, and loading a pickle can run arbitrary code"),
        (["https://example.com/x.safetensors"], "is a URL, and LoRAs are not downloaded"),
    ],
)
def test_bad_lora_files_fail_the_task_before_loading(session: Session, loras: list[str], expected: str) -> None:
    with pytest.raises(UserInputError, match=expected) as info:
        session.prepare({"model_type": "toy", "activated_loras": loras}, "tasks.json[3]")
    assert str(info.value).startswith("tasks.json[3]: ")


def test_unknown_model_type_is_an_error_with_a_suggestion(session: Session) -> None:
    with pytest.raises(PresetError, match="did you mean 'toy'"):
        session.prepare({"model_type": "toys"})


def test_prepare_tasks_keeps_going_after_a_bad_one(session: Session, tmp_path: Path) -> None:
    path = write_json(tmp_path / "tasks.json", [{"model_type": "toy"}, {"model_type": "toy", "seed": "x"}, {"model_type": "toy"}])
    prepared = prepare_tasks(session, read_task_file(path))
    assert [p.error is None for p in prepared] == [True, False, True]
    assert prepared[1].where == f"{path}[1]" and "seed" in str(prepared[1].error)


def test_task_file_forms_and_errors(tmp_path: Path) -> None:
    single = write_json(tmp_path / "one.json", {"model_type": "toy"})
    assert [t.where for t in read_task_file(single)] == [str(single)]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"model_type": "toy"},\n oops\n]')
    with pytest.raises(SettingsError, match="bad.json:3:"):
        read_task_file(bad)
    scalar = write_json(tmp_path / "scalar.json", 3)
    with pytest.raises(SettingsError, match="a settings object or a list"):
        read_task_file(scalar)


def test_generation_info_of_a_saved_image_is_accepted_and_dropped(session: Session) -> None:
    task = session.prepare({"model_type": "toy", "generation_info": {"program": "x"}})
    assert "generation_info" not in task.settings


def test_random_seed_is_resolved_and_recorded(session: Session) -> None:
    result = session.run(session.prepare({"model_type": "toy"}))
    assert result.settings["seed"] >= 0
    assert result.info["files"]["transformer"]["name"] == "toy_quanto_bf16_int8.safetensors"  # int8 by default
    again = session.run(session.prepare({**result.settings}))
    assert again.images[0].tobytes() == result.images[0].tobytes()


def test_quantization_setting_picks_the_variant(session: Session) -> None:
    files = session.files_for(session.prepare({"model_type": "toy", "quantization": "bf16"}))
    assert files["transformer"].name == "toy_bf16.safetensors" and files["vae"].name == "toy_vae.safetensors"


def test_model_is_loaded_once_for_tasks_that_share_it(session: Session) -> None:
    import sys

    loads = sys.modules[type(session.registry.handler_for("toy")).__module__].LOADS
    before = len(loads)
    for seed in (1, 2):
        session.run(session.prepare({"model_type": "toy", "seed": seed}))
    assert len(loads) == before + 1
    session.run(session.prepare({"model_type": "toy", "quantization": "bf16"}))  # other files: reload
    assert len(loads) == before + 2


def test_saved_json_round_trip_of_settings(session: Session, tmp_path: Path) -> None:
    result = session.run(session.prepare({"model_type": "toy", "seed": 5}))
    [path] = session.save(result, tmp_path / "out")
    [raw] = read_task_file(path)
    assert json.loads(json.dumps(raw.settings))["generation_info"]["program"].startswith("wgp-zimage")
    assert session.prepare(raw.settings).settings == result.settings


def test_loras_are_found_in_the_family_lora_folder(tmp_path: Path) -> None:
    """Family folder first, then the root `loras/`; `../` cannot climb out; an absolute path is the user's choice."""
    import argparse

    config = toy_env(tmp_path)
    family, root = tmp_path / "loras" / "toy", tmp_path / "loras"
    for path in (family / "style.safetensors", root / "shared.safetensors", tmp_path / "elsewhere.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"lora")
    config.lora_args = argparse.Namespace(lora_dir_toy=family, loras=root)
    session = Session(config)
    preset = session.catalog.get("toy")
    names = ["style.safetensors", "shared.safetensors", str(tmp_path / "elsewhere.safetensors")]
    choice = session.lora_choice(preset, {"activated_loras": names, "loras_multipliers": "0.7 1,0.5"})
    expected = ((family / "style.safetensors").resolve(), (root / "shared.safetensors").resolve(), tmp_path / "elsewhere.safetensors")
    assert choice.paths == expected
    assert choice.multipliers == ("0.7", "1.0,0.5", "1.0")
    with pytest.raises(CheckpointError, match="tasks.json\\[0\\]: activated_loras: LoRA name '../../elsewhere.safetensors' points outside"):
        session.prepare({"model_type": "toy", "activated_loras": ["../../elsewhere.safetensors"]}, "tasks.json[0]")
    with pytest.raises(SettingsError, match="task: the toy family cannot apply LoRAs"):  # found, but the family has no normaliser
        session.prepare({"model_type": "toy", "activated_loras": ["style.safetensors"]})
