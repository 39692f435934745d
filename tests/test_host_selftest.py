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

pytest.importorskip("models.z_image.loading_z_image", reason="the engine's loader has not landed")


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
