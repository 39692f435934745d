"""End to end with the real Z-Image engine and its tiny random model: discovery -> preset -> files ->
load -> generate -> save -> `--process` the saved image -> the identical image. No download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import wgp
from host import cli
from host.registry import REPO_ROOT
from host.session import HostConfig
from models.z_image import loading_z_image  # noqa: F401  (the engine must import: a broken one fails, never skips)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checkpoint folder for the module: the self-test files are written once, on first use."""
    return tmp_path_factory.mktemp("ckpts")


def _args(ckpts: Path, out: Path, finetunes: Path | None = None) -> list[str]:
    args = ["--ckpts", str(ckpts), "--output-dir", str(out), "--offline", "--device", "cpu"]
    return args + (["--finetunes-dir", str(finetunes)] if finetunes else [])


def test_selftest_writes_a_png_whose_settings_regenerate_it(ckpts: Path, tmp_path: Path) -> None:
    assert cli.main(["--selftest", "--seed", "11", *_args(ckpts, tmp_path / "a")]) == 0
    [first] = list((tmp_path / "a").glob("*.png"))
    assert (ckpts / "z_image_selftest" / "Qwen3" / "tokenizer.json").is_file()
    settings = json.loads(Image.open(first).info["wgp_settings"])
    assert settings["seed"] == 11 and settings["model_type"] == "z_image_selftest"
    info = settings["generation_info"]
    assert info["files"]["transformer"]["name"] == "ZImageTurbo_bf16.safetensors" and len(info["model_hash"]) == 64
    assert cli.main(["--process", str(first), *_args(ckpts, tmp_path / "b")]) == 0
    [second] = list((tmp_path / "b").glob("*.png"))
    assert Image.open(first).tobytes() == Image.open(second).tobytes()


def test_guidance_batch_and_webp_through_the_cli(ckpts: Path, tmp_path: Path) -> None:
    flags = [
        "--model",
        "z_image_selftest",
        "--prompt",
        "a cat",
        "--negative-prompt",
        "blurry",
        "--guidance",
        "3",
        "--batch-size",
        "2",
        "--resolution",
        "64x48",
        "--output-format",
        "webp",
        "--seed",
        "5",
    ]
    assert cli.main([*flags, *_args(ckpts, tmp_path)]) == 0
    images = sorted(tmp_path.glob("*.webp"))
    assert len(images) == 2 and Image.open(images[0]).size == (64, 48)
    assert images[0].read_bytes() != images[1].read_bytes()


def test_python_api_with_the_selftest_model(ckpts: Path) -> None:
    model = wgp.load_model("z_image_selftest", ckpts=ckpts, offline=True, device="cpu")
    first = model.generate(prompt="a red fox", seed=3)
    second = model.generate(prompt="a red fox", seed=3)
    other = model.generate(prompt="a red fox", seed=4)
    assert first[0].size == (64, 64)
    assert first[0].tobytes() == second[0].tobytes() != other[0].tobytes()
    wgp.release_model()


def test_finetune_pointing_at_a_diffusers_folder_is_a_usable_model(tmp_path: Path) -> None:
    from models.z_image.tiny_z_image import write_diffusers_layout

    folder = write_diffusers_layout(tmp_path / "Z-Image-Tiny-diffusers", seed=1)
    finetunes = tmp_path / "finetunes"
    finetunes.mkdir()
    preset = {
        "model": {"name": "Tiny diffusers folder", "architecture": "z_image", "URLs": [str(folder)]},
        "resolution": "64x64",
        "num_inference_steps": 2,
    }
    (finetunes / "my_tiny.json").write_text(json.dumps(preset))
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    assert cli.main(["--model", "my_tiny", "--prompt", "hello", "--seed", "1", *_args(ckpts, out, finetunes)]) == 0
    [saved] = list(out.glob("*.png"))
    config = HostConfig(finetunes_dir=finetunes, ckpts=ckpts, allow_download=False, device="cpu")
    images = wgp.load_model("my_tiny", config=config).generate("hello", seed=1)
    assert images[0].tobytes() == Image.open(saved).tobytes()
    wgp.release_model()


def test_shipped_presets_report_missing_weights_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--model", "z_image_base", "--prompt", "x", *_args(tmp_path / "empty", tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "https://huggingface.co/DeepBeepMeep/Z-Image/resolve/main/ZImageBase_quanto_bf16_int8.safetensors" in err
    assert f"put it at: {tmp_path / 'empty' / 'Qwen3' / 'qwen3_quanto_bf16_int8.safetensors'}" in err
    assert "ZImageTurbo_VAE_bf16.safetensors" in err and "Qwen3/tokenizer.json" in err
    assert not (tmp_path / "out").exists()
    assert REPO_ROOT.joinpath("defaults", "z_image_base.json").is_file()


def _selftest_def(folder: str) -> dict:
    return {
        "name": "self-test elsewhere",
        "architecture": "z_image",
        "URLs": [f"{folder}/ZImageTurbo_bf16.safetensors"],
        "text_encoder_URLs": [f"{folder}/Qwen3/qwen3_bf16.safetensors"],
        "selftest": True,
    }


def test_selftest_finetune_pointing_outside_the_checkpoints_is_refused_and_deletes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    finetunes = tmp_path / "finetunes"
    finetunes.mkdir()
    for name, folder in (("evil_up", "../victim"), ("evil_abs", str(victim))):
        preset = {"model": _selftest_def(folder), "resolution": "64x64", "num_inference_steps": 1}
        (finetunes / f"{name}.json").write_text(json.dumps(preset))
    for name in ("evil_up", "evil_abs"):
        code = cli.main(["--model", name, "--prompt", "x", *_args(tmp_path / "ckpts", tmp_path / "out", finetunes)])
        assert code == 1
        err = capsys.readouterr().err
        assert f"{name}.json" in err and "sub-folder of the checkpoints folder" in err
    assert [p.name for p in victim.iterdir()] == ["keep.txt"] and (victim / "keep.txt").read_text() == "mine"


def test_selftest_writer_only_adds_files_inside_the_checkpoints(tmp_path: Path) -> None:
    from common.errors import CheckpointError
    from models.z_image.z_image_handler import family_handler

    ckpts, victim = tmp_path / "ckpts", tmp_path / "victim"
    (ckpts / "mine").mkdir(parents=True)
    (ckpts / "mine" / "notes.txt").write_text("keep")
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (ckpts / "link").symlink_to(victim, target_is_directory=True)
    family_handler.write_selftest_files("z_image", _selftest_def("mine"), ckpts)
    assert (ckpts / "mine" / "notes.txt").read_text() == "keep"
    for name in ("ZImageTurbo_bf16.safetensors", "ZImageTurbo_VAE_bf16_config.json", "Qwen3/tokenizer.json", "Qwen3/config.json"):
        assert (ckpts / "mine" / name).is_file()
    assert sorted(p.name for p in ckpts.iterdir()) == ["link", "mine"]  # the temporary folder is gone
    weights = (ckpts / "mine" / "ZImageTurbo_bf16.safetensors").stat().st_mtime_ns
    family_handler.write_selftest_files("z_image", _selftest_def("mine"), ckpts)  # complete: nothing rewritten
    assert (ckpts / "mine" / "ZImageTurbo_bf16.safetensors").stat().st_mtime_ns == weights
    bad = {
        "../victim": "not a path inside",
        str(victim): "not a path inside",
        "link": "through a link",
        ".": "not a file in a sub-folder",
    }
    for folder, message in bad.items():
        model_def = _selftest_def(folder)
        if folder == ".":
            model_def = {**model_def, "URLs": ["ZImageTurbo_bf16.safetensors"], "text_encoder_URLs": ["Qwen3/qwen3_bf16.safetensors"]}
        with pytest.raises(CheckpointError, match=message):
            family_handler.write_selftest_files("z_image", model_def, ckpts)
    renamed = {**_selftest_def("other"), "URLs": ["other/my_model.safetensors"]}
    with pytest.raises(CheckpointError, match="z_image_selftest"):
        family_handler.write_selftest_files("z_image", renamed, ckpts)
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]
    assert not (ckpts / "ZImageTurbo_bf16.safetensors").exists() and not (ckpts / "other").exists()
