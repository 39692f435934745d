"""Other tools' files here, ours there (issue 12): Wan2GP's settings, queues, presets and images run through
`--process`; ComfyUI and A1111 images fill the web form; our images carry Wan2GP's `comment` chunk; other tools'
keys are ignored when they change nothing and refused by name when they would; LoRAs named by URL are found by
file name. The files are built by tests/fixtures/other_tools.py from each tool's published format."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from common.errors import CheckpointError, SettingsError
from host import cli, foreign
from host.outputs import read_settings, save_image
from host.session import Destination, HostConfig, Session
from host.tasks import read_task_file
from tests.fixtures import other_tools as ot
from tests.fixtures.host_env import toy_env, write_bytes

# -- strict for ours, lenient for theirs ------------------------------------------------------------------


def test_keys_are_sorted_into_ours_ignored_refused_and_unknown() -> None:
    known = {"prompt", "seed", "NAG_scale"}
    ours, ignored = foreign.split_settings(
        {"prompt": "x", "seed": 1, "NAG_scale": 1.0, "type": "WanGP v13", "image_mode": 1, "NAG_tau": 9}, known, "t.json"
    )
    assert ours == {"prompt": "x", "seed": 1, "NAG_scale": 1.0}
    assert ignored == {"type": "WanGP v13", "image_mode": 1, "NAG_tau": 9}  # NAG_tau acts only through NAG_scale
    assert foreign.split_settings({"NAG_scale": 4.0}, known, "t.json") == ({"NAG_scale": 4.0}, {})  # declared: the family's
    with pytest.raises(SettingsError, match=r"^t.json: not supported by this program: NAG_scale=4 \(Normalized"):
        foreign.split_settings({"NAG_scale": 4}, {"prompt"}, "t.json")
    with pytest.raises(SettingsError, match=r"^t.json: not supported by this program: NAG_tau=9"):
        foreign.split_settings({"NAG_scale": 2, "NAG_tau": 9}, {"NAG_scale"}, "t.json")  # NAG on: tau matters
    with pytest.raises(SettingsError, match=r"^t.json: unknown setting 'promt'; did you mean 'prompt'\?"):
        foreign.split_settings({"promt": "x"}, known, "t.json")


@pytest.fixture
def toy(tmp_path: Path) -> Session:
    return Session(toy_env(tmp_path))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"repeat_generation": 3}, "not supported by this program: repeat_generation=3 (Wan2GP's repeat count); use 1"),
        ({"guidance_phases": 2}, "not supported by this program: guidance_phases=2"),
        ({"image_mode": 0}, "not supported by this program: image_mode=0"),
        ({"prompt": "a fox\na cat", "multi_prompts_gen_type": "G"}, "not supported by this program: multi_prompts_gen_type=G"),
        ({"image_refs": ["ref.png"]}, 'not supported by this program: image_refs=\\["ref.png"\\]'),
        ({"sample_solver": "unified"}, "not supported by this program: sample_solver=unified"),
        ({"skip_steps_cache_type": "mag", "skip_steps_multiplier": 2}, "not supported by this program: skip_steps_cache_type=mag"),
        ({"imagemode": 1}, "unknown setting 'imagemode'"),
    ],
)
def test_a_wan2gp_feature_that_would_change_the_image_is_refused_by_name(toy: Session, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", "\\(").replace(")", "\\)")) as info:
        toy.prepare({"model_type": "toy", **extra}, "queue.json[2]")
    assert str(info.value).startswith("queue.json[2]: ")


def test_wan2gp_provenance_and_neutral_keys_run_and_are_kept_in_the_saved_record(toy: Session, tmp_path: Path) -> None:
    record = {k: v for k, v in ot.WAN2GP_RECORD.items() if k not in ("flow_shift",)} | {"model_type": "toy", "prompt": "a fox\n# a comment"}
    task = toy.prepare(record, "wan2gp.json")
    assert task.ignored["settings_version"] == 2.79 and task.ignored["image_mode"] == 1 and task.ignored["NAG_scale"] == 1.0
    assert task.settings["seed"] == 1234 and "image_mode" not in task.settings and "type" not in task.settings
    result = toy.run(task, save_to=Destination(tmp_path / "out"))
    saved = read_settings(result.paths[0])
    assert saved["generation_info"]["ignored_settings"]["type"] == ot.WAN2GP_RECORD["type"]
    assert "image_mode" not in saved  # the task part stays ours: --process of the saved image is strict again
    assert toy.prepare(saved, "again").settings == task.settings


# -- Wan2GP's behaviour followed where the intent is clear --------------------------------------------------


def test_wan2gp_differences_are_followed_each_with_a_note() -> None:
    session = Session()  # the shipped presets: validation only
    turbo = session.prepare(ot.wan2gp_record(resolution="1000x1000", guidance_scale=0.5, flow_shift=5.0), "w.png")
    assert turbo.settings["resolution"] == "992x992" and turbo.settings["guidance_scale"] == 0.0
    assert turbo.settings["flow_shift"] == 3.0  # Turbo's own shift: Wan2GP ignores flow_shift for Z-Image
    assert turbo.notes == [
        "resolution 1000x1000 rounded down to 992x992 (multiples of 16), as Wan2GP does",
        "guidance_scale 0.5 is no guidance in Wan2GP (it guides above 1, this program above 0): run with guidance_scale 0",
        "flow_shift 5.0 dropped: Wan2GP does not use it for Z-Image (the model's shift 3 applies)",
    ]
    base = session.prepare(ot.wan2gp_record(model_type="z_image_base", guidance_scale=4.0, negative_prompt=""), "b.png")
    assert base.settings["negative_prompt"].startswith("low quality, worst quality") and len(base.notes) == 2  # shift, negative
    ours = {k: v for k, v in ot.wan2gp_record(resolution="1000x1000").items() if k not in ("settings_version", "type")}
    with pytest.raises(SettingsError, match="width must be a multiple of 16 \\(got 1000\\)"):
        session.prepare(ours, "ours.json")  # not Wan2GP's file: our rules
    assert session.prepare({"model_type": "z_image", "prompt": "x", "guidance_scale": 0.5}).settings["guidance_scale"] == 0.5


def test_wan2gp_presets_and_finetune_editor_keys_load(tmp_path: Path) -> None:
    finetunes = tmp_path / "finetunes"
    ot.write_json(finetunes / "z_image.json", ot.WAN2GP_PRESET)
    ot.write_json(finetunes / "z_image_film.json", ot.WAN2GP_FINETUNE)
    session = Session(HostConfig(finetunes_dir=finetunes, ckpts=tmp_path / "ckpts", allow_download=False, device="cpu"))
    assert session.catalog.errors == []
    film = session.catalog.get("z_image_film")
    assert film.model_def["infos"] == "A **film** look." and film.settings["image_mode"] == 1
    assert session.catalog.get("z_image").model_def["URLs"] == ot.WAN2GP_PRESET["model"]["URLs"]
    assert session.prepare({"model_type": "z_image_film"}).settings["prompt"] == "a street at night, 35mm film"


# -- every container Wan2GP writes, through --process on the self-test model --------------------------------


def _wan2gp_files(folder: Path) -> tuple[list[Path], int]:
    """One file of each container (and the number of tasks they hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [
        ot.write_json(folder / "exported.json", ot.wan2gp_record(seed=1)),
        ot.write_json(folder / "list.json", [ot.wan2gp_record(seed=2), ot.wan2gp_record(seed=3)]),
        ot.write_json(folder / "manifest.json", [{"id": 7, "params": ot.wan2gp_record(seed=4), "plugin_data": {}}]),
        ot.wan2gp_queue_zip(folder / "queue.zip", [ot.wan2gp_record(seed=5), ot.wan2gp_record(seed=6)]),
        ot.write_json(  # Wan2GP's UI settings file: no model_type, it is in the file name
            folder / "settings" / "z_image_settings.json", {k: v for k, v in ot.wan2gp_record(seed=7).items() if k != "model_type"}
        ),
        ot.wan2gp_png(folder / "itxt.png", ot.wan2gp_record(seed=8, prompt="un renard roux dans la neige, lumière dorée")),
        ot.wan2gp_png(folder / "text.png", ot.wan2gp_record(seed=9), kind=b"tEXt"),
        ot.wan2gp_exif_image(folder / "unicode.jpg", ot.wan2gp_record(seed=10, prompt="雪の中の赤い狐"), "JPEG"),
        ot.wan2gp_exif_image(folder / "ascii.webp", ot.wan2gp_record(seed=11), "WEBP"),
        ot.write_json(folder / "z_image.json", ot.WAN2GP_PRESET),
    ]
    return files, 12  # the list and the queue hold two tasks each


def test_every_wan2gp_container_runs_through_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files, count = _wan2gp_files(tmp_path / "wan2gp")
    out = tmp_path / "out"
    flags = ["--model", "z_image_selftest", "--resolution", "64x64", "--steps", "1"]  # the preset says 1024x1024, 8 steps
    args = ["--ckpts", str(tmp_path / "ckpts"), "--output-dir", str(out), "--offline", "--device", "cpu"]
    assert cli.main(["--process", *map(str, files), *flags, *args]) == 0
    printed = capsys.readouterr().out
    assert f"{count} of {count} task(s) succeeded" in printed
    assert "note: " in printed and "model_type 'z_image' replaced by 'z_image_selftest' (--model)" in printed
    assert "model_type 'z_image' from the file name" in printed and "a preset: its settings run on" in printed
    saved = {read_settings(p)["seed"]: read_settings(p) for p in out.glob("*.png")}
    assert set(range(1, 12)) <= set(saved) and len(list(out.glob("*.png"))) == count  # the preset's seed is random
    assert saved[10]["prompt"] == "雪の中の赤い狐" and saved[8]["prompt"].endswith("lumière dorée")
    assert saved[1]["generation_info"]["ignored_settings"]["settings_version"] == 2.79


def _queue_with_a_start_image(folder: Path) -> Path:
    start = ot.plain_png((64, 64), (10, 200, 30))
    task = ot.wan2gp_record(seed=6, image_start="task1_image_start.png", image_prompt_type="S", denoising_strength=0.5)
    return ot.wan2gp_queue_zip(folder / "queue.zip", [task], {"task1_image_start.png": start})


def test_a_queued_input_image_is_extracted_and_given_as_a_path(tmp_path: Path) -> None:
    [task] = read_task_file(_queue_with_a_start_image(tmp_path))
    start = Path(task.settings["image_start"])
    assert start.is_absolute() and Image.open(start).getpixel((0, 0)) == (10, 200, 30)
    assert task.source == "Wan2GP" and task.where.endswith("queue.zip:queue.json[0]")
    [again] = read_task_file(tmp_path / "queue.zip")  # the same queue file: the same folder, nothing rewritten
    assert again.settings["image_start"] == str(start)


def test_a_queued_start_image_reaches_image_to_image(tmp_path: Path) -> None:
    from models.z_image.z_image_handler import family_handler

    if "image_start" not in {s.name for s in family_handler.query_settings_schema("z_image")}:
        pytest.skip("the Z-Image family declares no image_start yet")
    out = tmp_path / "out"
    args = ["--ckpts", str(tmp_path / "ckpts"), "--output-dir", str(out), "--offline", "--device", "cpu", "--steps", "2"]
    assert cli.main(["--process", str(_queue_with_a_start_image(tmp_path)), "--model", "z_image_selftest", *args]) == 0
    [path] = out.glob("*.png")
    saved = read_settings(path)
    assert saved["denoising_strength"] == 0.5 and Path(saved["image_start"]).is_file()
    assert saved["generation_info"]["inputs"]["image_start"]["name"] == Path(saved["image_start"]).name


def test_a_broken_queue_fails_alone_with_its_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(SettingsError, match="bad.zip: not a readable .zip queue"):
        read_task_file(bad)
    empty = ot.wan2gp_queue_zip(tmp_path / "empty.zip", [])
    assert read_task_file(empty) == []
    import zipfile

    with zipfile.ZipFile(tmp_path / "nomanifest.zip", "w") as archive:
        archive.writestr("readme.txt", "x")
    with pytest.raises(SettingsError, match="no queue.json in this .zip"):
        read_task_file(tmp_path / "nomanifest.zip")
    escaping = ot.wan2gp_queue_zip(tmp_path / "escape.zip", [ot.wan2gp_record(image_start="../../etc/passwd")], {"../../etc/passwd": b"x"})
    [task] = read_task_file(escaping)
    assert task.settings["image_start"] == "../../etc/passwd"  # not extracted: validation then refuses the path


# -- our images read the way Wan2GP reads images ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_our_image_gives_wan2gp_its_settings(tmp_path: Path, fmt: str) -> None:
    settings = {
        "model_type": "z_image", "prompt": "a fox, 狐", "negative_prompt": "", "resolution": "64x48",
        "num_inference_steps": 8, "guidance_scale": 1.5, "flow_shift": 3.0, "seed": 77, "batch_size": 1,
        "activated_loras": ["style.safetensors"], "loras_multipliers": "0.8", "quantization": "int8", "output_format": fmt,
    }
    info = {"program": "wgp-zimage 0.1.0", "model_name": "Z-Image Turbo 6B"}
    path = save_image(Image.new("RGB", (64, 48)), tmp_path, f"x.{'jpg' if fmt == 'jpeg' else fmt}", settings, info, fmt)
    found = ot.read_like_wan2gp(path)
    assert found is not None
    assert (found["prompt"], found["seed"], found["num_inference_steps"], found["guidance_scale"], found["model_type"]) == (
        "a fox, 狐", 77, 8, 1.5, "z_image"
    )
    assert found["activated_loras"] == ["style.safetensors"] and found["resolution"] == "64x48"
    if fmt == "png":
        assert found["image_mode"] == 1 and found["type"] == "wgp-zimage 0.1.0 - Z-Image Turbo 6B"
        assert "quantization" not in found and found["image_quality"] == "png"
        assert read_settings(path)["quantization"] == "int8"  # our own chunk still wins for us


# -- ComfyUI and A1111 images fill the web form --------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> Any:
    from host.web.events import WebApp

    web = WebApp(Session(HostConfig(finetunes_dir=None, ckpts=tmp_path / "ckpts", allow_download=False, device="cpu")), None)
    web.c = {name: name for name in [*web.field_ids, "status", "family", "resolution", "page", "size_note"]}
    web.c |= {name: name for name in ("progress", "preview", "gallery", "queue", "settings_drop")}
    return web


def _shown(updates: dict[str, Any]) -> dict[str, Any]:
    return {name: u["value"] for name, u in updates.items() if isinstance(u, dict) and "value" in u}


@pytest.mark.parametrize("chunks", ["prompt", "workflow", "both"])
def test_a_comfyui_z_image_png_fills_the_form(app: Any, tmp_path: Path, chunks: str) -> None:
    prompt = ot.comfy_api_graph() if chunks in ("prompt", "both") else None
    workflow = ot.comfy_ui_graph() if chunks in ("workflow", "both") else None
    path = ot.comfy_png(tmp_path / "ComfyUI_00001_.png", prompt, workflow)
    updates = app.on_drop(str(path), "z_image")
    shown = _shown(updates)
    assert shown["prompt"] == ot.COMFY_PROMPT_TEXT and shown["negative_prompt"] == ""
    assert (shown["seed"], shown["steps"], shown["guidance"], shown["flow_shift"]) == (987654321, 9, 0.0, 3.5)
    assert (shown["width"], shown["height"], shown["batch_size"]) == (1024, 768, 1)
    assert shown["loras"] == ["zimage/film_grain.safetensors", "detail.safetensors"]  # applied in this order
    assert shown["loras_multipliers"] == "0.5 0.8"
    status = updates["status"]
    assert "ComfyUI workflow" in status and "res_multistep/simple not carried over" in status
    assert "model" not in shown or shown.get("model") == "z_image"


def test_an_a1111_png_fills_the_form(app: Any, tmp_path: Path) -> None:
    updates = app.on_drop(str(ot.a1111_png(tmp_path / "00012-42.png")), "z_image")
    shown = _shown(updates)
    assert shown["prompt"] == "a cabin in a pine forest,  soft fog" and shown["negative_prompt"] == "blurry, oversaturated"
    assert (shown["seed"], shown["steps"], shown["guidance"], shown["width"], shown["height"]) == (42, 9, 4.0, 768, 512)
    assert shown["loras"] == ["film_grain.safetensors"] and shown["loras_multipliers"] == "0.7"
    assert "A1111 CFG scale 5 is guidance_scale 4 here" in updates["status"]
    assert "not available here" not in updates["status"]  # A1111's checkpoint name is not taken as a model type


def test_a_wan2gp_png_dropped_on_the_form_is_adapted(app: Any, tmp_path: Path) -> None:
    path = ot.wan2gp_png(tmp_path / "wan.png", ot.wan2gp_record(resolution="1000x1000", guidance_scale=0.7))
    updates = app.on_drop(str(path), "z_image")
    shown = _shown(updates)
    assert (shown["width"], shown["height"], shown["guidance"]) == (992, 992, 0.0)
    assert "Wan2GP settings" in updates["status"] and "rounded down to 992x992" in updates["status"]


# -- LoRAs named by URL ---------------------------------------------------------------------------------------


def test_a_lora_named_by_url_is_found_by_its_file_name(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    family, root = tmp_path / "loras" / "toy", tmp_path / "loras"
    write_bytes(family / "style.safetensors", b"x")
    write_bytes(root / "sub" / "shared.safetensors", b"x")
    config.lora_args = argparse.Namespace(lora_dir_toy=family, loras=root)
    session = Session(config)
    preset = session.catalog.get("toy")
    urls = [
        "https://huggingface.co/someone/loras/resolve/main/style.safetensors?download=true",
        "https://civitai.example/files/shared.safetensors|sub",
    ]
    choice = session.lora_choice(preset, {"activated_loras": urls, "loras_multipliers": "0.6 1"})
    assert choice.paths == ((family / "style.safetensors").resolve(), (root / "sub" / "shared.safetensors").resolve())
    assert choice.names == tuple(urls)
    with pytest.raises(CheckpointError, match="is a URL, and LoRAs are not downloaded: no file 'gone.safetensors' in"):
        session.lora_choice(preset, {"activated_loras": ["https://x.example/gone.safetensors"]})


# -- the Python API -------------------------------------------------------------------------------------------


def test_the_api_generates_from_another_tools_file(tmp_path: Path) -> None:
    import wgp

    model = wgp.load_model("toy", config=toy_env(tmp_path))
    png = ot.wan2gp_png(tmp_path / "wan.png", ot.wan2gp_record(seed=31, resolution="48x48", num_inference_steps=2))
    images = model.generate_from(png, output_dir=tmp_path / "out")
    assert len(images) == 1 and images[0].size == (48, 48)
    assert model.last_result is not None and model.last_result.settings["seed"] == 31
    assert "model_type 'z_image' replaced by 'toy' (--model)" in model.last_notes


# -- the handler's Wan2GP-named methods ---------------------------------------------------------------------


def test_z_image_handler_answers_wan2gps_calls(tmp_path: Path) -> None:
    from models.z_image.facts_z_image import FACTS
    from models.z_image.z_image_handler import family_handler as h

    assert h.query_model_family() == "z_image"
    factors, bias = h.get_rgb_factors("z_image")
    assert factors == [list(r) for r in FACTS.latent.rgb_factors] and len(factors) == 16 and len(factors[0]) == 3
    assert bias == list(FACTS.latent.rgb_bias)
    parser = argparse.ArgumentParser()
    h.register_lora_cli_args(parser, str(tmp_path / "root"))
    args = parser.parse_args([])
    assert h.get_lora_dir("z_image", args, str(tmp_path / "root")) == tmp_path / "root" / "z_image"
    assert h.get_lora_dir("z_image", parser.parse_args(["--lora-dir-z-image", "/x"]), "/r") == Path("/x")
    settings = {"guidance_scale": 1.0, "flow_shift": 3.0}
    assert h.fix_settings("z_image", 2.79, {}, settings) == [
        "guidance_scale 1 is no guidance in Wan2GP (it guides above 1, this program above 0): run with guidance_scale 0"
    ]
    assert settings == {"guidance_scale": 0.0}


def test_reading_a_saved_image_of_ours_still_comes_first(tmp_path: Path) -> None:
    settings = {"model_type": "toy", "prompt": "p", "seed": 5, "resolution": "16x16"}
    ours = save_image(Image.new("RGB", (16, 16)), tmp_path, "ours.png", settings, {"program": "wgp-zimage 0.1.0"})
    [task] = read_task_file(ours)
    assert task.source is None and task.settings["seed"] == 5 and "type" not in task.settings
    shutil.copy(ours, tmp_path / "copy.png")
    assert json.loads(Image.open(tmp_path / "copy.png").info["comment"])["seed"] == 5


def test_bypassed_and_unknown_comfyui_nodes_are_not_taken_for_loras(tmp_path: Path) -> None:
    from host.comfyui import settings_from_comfy

    workflow = ot.comfy_ui_graph()
    next(n for n in workflow["nodes"] if n["id"] == 20)["mode"] = 4  # the detail LoRA bypassed in the UI
    found = settings_from_comfy(None, workflow)
    assert found.settings["activated_loras"] == ["zimage/film_grain.safetensors"] and found.settings["loras_multipliers"] == "0.5"
    api = ot.comfy_api_graph()
    api["11"]["inputs"]["model"] = ["30", 0]
    api["30"] = {"class_type": "CFGNorm", "inputs": {"strength": 1.0, "model": ["20", 0]}}
    found = settings_from_comfy(api, None)
    assert "ComfyUI node CFGNorm on the model not carried over" in found.notes
    assert found.settings["activated_loras"] == ["zimage/film_grain.safetensors", "detail.safetensors"]
    with pytest.raises(SettingsError, match="no KSampler in this ComfyUI graph"):
        settings_from_comfy({"1": {"class_type": "SaveImage", "inputs": {}}}, None)


def test_an_image_naming_no_model_type_asks_for_model(tmp_path: Path) -> None:
    from host.tasks import prepare_tasks

    [raw] = read_task_file(ot.a1111_png(tmp_path / "a.png"))
    [prepared] = prepare_tasks(Session(), [raw])
    assert prepared.task is None and "'model_type' is required" in str(prepared.error)
    assert "no model type in this image (A1111 parameters): give one with --model" in str(prepared.error)
