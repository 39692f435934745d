"""Hostile and careless inputs (issue 9, items 4-7, 11, 12): each fails its own task with one line, or works.

Every test here reproduces an input found by outside testing: non-finite or overflowing numbers, a LoRA
symlink loop, PNG task files built to exhaust memory or recursion, unbounded prompts, bad destinations,
diffusers-style `width=`/`height=`, and presets of weight formats this program cannot load.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

import wgp
from common.errors import CheckpointError, SettingsError
from host import cli
from host.lora import apply_loras, parse_multipliers, read_lora_file
from host.outputs import MAX_EMBEDDED_CHARS, read_settings, remove_stale_temp_files
from host.presets import PresetError, load_presets, unloadable_format
from host.registry import discover
from host.session import HostConfig, Session
from host.settings import MAX_TEXT_CHARS
from host.tasks import RawTask, prepare_tasks, read_task_files
from host.web.models import count_tokens
from models.z_image.settings_z_image import GenerationSettings
from tests.fixtures.host_env import cli_args, toy_env, write_json
from tests.lora_fixtures import DIALECTS, NORMALIZER, random_lora, tiny_model

REPO = Path(__file__).resolve().parents[1]


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.exists() else []


def _failed_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("FAILED ")]


# -- hand-made PNG files ----------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, chunks: list[bytes], rows: int | None = None) -> bytes:
    """An 8-bit greyscale PNG; `rows` limits the pixel data written (a header that claims more than it holds)."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    raw = b"".join(b"\0" + bytes(width) for _ in range(height if rows is None else rows))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _deflate_bomb(megabytes: int) -> bytes:
    """A zlib stream that inflates to `megabytes` MB of 'a' (one flushed 1 MB block repeated: built in ~0.3 s)."""
    block = b"a" * (1 << 20)
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)  # self-contained after the header
    checksum = 1
    for _ in range(megabytes):
        checksum = zlib.adler32(block, checksum)
    return first[:2] + first[2:] * megabytes + b"\x03\x00" + checksum.to_bytes(4, "big")  # empty final block


def _nested_json(depth: int) -> str:
    return '{"model_type": "toy", "x": ' + "[" * depth + "]" * depth + "}"


def hostile_pngs(folder: Path) -> dict[str, Path]:
    """The three PNG task files of issue 9 item 4."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        # declares 20000 x 20000 = 400 million pixels (PIL's bomb threshold is 179 million)
        "bomb": _png(20_000, 20_000, [], rows=2),
        # a zTXt settings chunk that inflates to 300 MB
        "ztxt": _png(16, 16, [_chunk(b"zTXt", b"wgp_settings\0\0" + _deflate_bomb(300))]),
        # settings JSON nested 100,000 levels deep
        "nested": _png(16, 16, [_chunk(b"iTXt", b"wgp_settings\0\0\0\0\0" + _nested_json(100_000).encode())]),
    }
    return {name: _write(folder / f"{name}.png", data) for name, data in files.items()}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- item 4: inputs that stopped a whole batch --------------------------------------------------------


def test_inf_and_nan_integers_fail_their_own_task_not_the_batch() -> None:
    """`"seed": "inf"` raised OverflowError and `"num_inference_steps": "nan"` ValueError out of prepare_tasks."""
    session = Session()  # the shipped presets; validation only, nothing loads
    bad = [
        {"seed": "inf"},
        {"num_inference_steps": "nan"},
        {"seed": float("nan")},
        {"batch_size": "-inf"},
        {"seed": 10**400},  # a JSON integer too large for float()
    ]
    raw = [RawTask({"model_type": "z_image", "prompt": "x", **b}, f"t[{i}]") for i, b in enumerate(bad)]
    raw.append(RawTask({"model_type": "z_image", "prompt": "fine", "seed": "42"}, "good"))
    prepared = prepare_tasks(session, raw)
    errors = [p.error for p in prepared[:-1]]
    assert all(e is not None and "\n" not in e for e in errors), errors
    assert "'seed' must be a whole number (got 'inf')" in errors[0]
    assert "'num_inference_steps' must be a whole number (got 'nan')" in errors[1]
    assert "'seed'" in errors[2] and "'batch_size'" in errors[3]
    assert "seed must be -1 (random) or between 0 and 2^63-1" in errors[4]
    assert prepared[-1].task is not None and prepared[-1].task.settings["seed"] == 42


def test_lora_symlink_loop_fails_its_task(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    loras = tmp_path / "loras_toy"
    loras.mkdir()
    (loras / "loop.safetensors").symlink_to(loras / "loop2.safetensors")
    (loras / "loop2.safetensors").symlink_to(loras / "loop.safetensors")
    session = Session(config)
    session.config.lora_args = cli.build_parser(session).parse_args(["--lora-dir-toy", str(loras)])
    raw = [RawTask({"model_type": "toy", "activated_loras": ["loop.safetensors"]}, "loop"), RawTask({"model_type": "toy"}, "ok")]
    loop, ok = prepare_tasks(session, raw)
    assert loop.error is not None and "'loop.safetensors'" in loop.error and "cannot be resolved" in loop.error
    assert "\n" not in loop.error
    assert ok.task is not None


def test_hostile_task_files_each_fail_with_one_line(tmp_path: Path) -> None:
    files = hostile_pngs(tmp_path)
    files["deep_json"] = _write(tmp_path / "deep.json", _nested_json(100_000).encode())
    files["huge_int_json"] = _write(tmp_path / "digits.json", b'{"model_type": "toy", "seed": ' + b"9" * 5000 + b"}")
    start = time.perf_counter()
    tasks, failed = read_task_files(list(files.values()))
    elapsed = time.perf_counter() - start
    assert tasks == [] and len(failed) == len(files)
    messages = {Path(f.where).name: f.error or "" for f in failed}
    assert all("\n" not in m for m in messages.values())
    assert "too many pixels" in messages["bomb.png"]
    assert "not a readable image" in messages["ztxt.png"] and "too large" in messages["ztxt.png"].lower()
    assert "nested too deeply" in messages["nested.png"] and "nested too deeply" in messages["deep.json"]
    assert "bad JSON" in messages["digits.json"]
    assert elapsed < 10  # nothing inflated: the 300 MB chunk and the 400-megapixel image are never decoded


def test_hostile_inputs_in_one_batch_leave_the_good_tasks_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI end to end: every bad input gets one FAILED line, the two good tasks still save their images."""
    config = toy_env(tmp_path)
    loras = tmp_path / "loras_toy"
    loras.mkdir()
    (loras / "loop.safetensors").symlink_to(loras / "loop.safetensors")
    pngs = hostile_pngs(tmp_path / "pngs")
    tasks = write_json(
        tmp_path / "tasks.json",
        [
            {"model_type": "toy", "prompt": "first", "seed": 1},
            {"model_type": "toy", "seed": "inf"},
            {"model_type": "toy", "num_inference_steps": "nan"},
            {"model_type": "toy", "activated_loras": ["loop.safetensors"]},
            {"model_type": "toy", "prompt": "last", "seed": 2},
        ],
    )
    argv = [*cli_args(config), "--lora-dir-toy", str(loras), "--process", str(tasks), *map(str, pngs.values())]
    assert cli.main(argv) == 1
    assert len(_pngs(config.output_dir)) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    assert len(_failed_lines(out.err)) == 6
    assert "2 of 8 task(s) succeeded" in out.out


# -- item 5: non-finite values ------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["guidance_scale", "flow_shift", "cfg_normalization", "cfg_truncation"])
@pytest.mark.parametrize("value", ["inf", "nan", float("inf"), float("-inf"), float("nan"), "1e999"])
def test_non_finite_floats_are_refused_naming_the_field(key: str, value: Any) -> None:
    with pytest.raises(SettingsError, match=f"'{key}' must be a finite number"):
        GenerationSettings.from_dict({"prompt": "x", key: value})


def test_non_finite_settings_in_a_task_file_fail_that_task(tmp_path: Path) -> None:
    """JSON itself accepts NaN and Infinity literals."""
    path = tmp_path / "tasks.json"
    path.write_text('[{"model_type": "z_image", "guidance_scale": Infinity}, {"model_type": "z_image", "flow_shift": NaN}]')
    tasks, failed = read_task_files([path])
    prepared = prepare_tasks(Session(), tasks)
    assert failed == [] and [p.task for p in prepared] == [None, None]
    assert "'guidance_scale' must be a finite number" in str(prepared[0].error)
    assert "'flow_shift' must be a finite number" in str(prepared[1].error)


@pytest.mark.parametrize("text", ["nan", "1e308", "-inf", "1,nan", "0.5 200"])
def test_lora_multipliers_must_be_finite_and_bounded(text: str) -> None:
    with pytest.raises(SettingsError, match="loras_multipliers: .* must be finite numbers between -100 and 100"):
        parse_multipliers(text, 2)
    assert parse_multipliers("-1.5 100", 2) == [[-1.5], [100.0]]


def test_lora_multiplier_nan_fails_the_task_before_loading(tmp_path: Path) -> None:
    model = tiny_model()
    lora = tmp_path / "style.safetensors"
    save_file({k: v.contiguous() for k, v in DIALECTS["ai-toolkit"](random_lora(model)).items()}, str(lora))
    raw = {"model_type": "z_image", "activated_loras": [str(lora)], "loras_multipliers": "nan"}
    [prepared] = prepare_tasks(Session(), [RawTask(raw, "task")])
    assert prepared.task is None and "loras_multipliers: 'nan' must be finite" in str(prepared.error)


class _Pipeline:
    """The seam's view of a loaded model: a `transformer` and a `generate`."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    def generate(self, settings: Any, on_step: Any = None) -> str:
        return "done"


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_lora_file_with_non_finite_weights_is_refused_naming_file_and_tensor(tmp_path: Path, poison: float) -> None:
    model = tiny_model()
    sd = DIALECTS["ai-toolkit"](random_lora(model))
    key = sorted(sd)[3]
    sd[key][0, 0] = poison
    path = tmp_path / "diverged.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match=rf"diverged.safetensors: tensor '{key}' holds NaN or infinite values"):
        read_lora_file(path)
    pipe = _Pipeline(model)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        apply_loras(pipe, [path], "1.0", normalizer=NORMALIZER)
    assert all(not m._forward_hooks for m in model.modules())  # nothing attached


# -- item 6: unbounded prompts --------------------------------------------------------------------------


def test_huge_prompt_is_refused_before_anything_tokenizes_it() -> None:
    prompt = "a red fox " * 5_000_000  # 50 million characters
    start = time.perf_counter()
    [prepared] = prepare_tasks(Session(), [RawTask({"model_type": "z_image", "prompt": prompt}, "task")])
    elapsed = time.perf_counter() - start
    assert prepared.task is None
    assert f"'prompt' is 50,000,000 characters; at most {MAX_TEXT_CHARS:,} are accepted" in str(prepared.error)
    assert elapsed < 5  # measured 0.1 s; tokenizing it took minutes


def test_longest_accepted_prompt_gives_a_bounded_image_that_reads_back(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    model = wgp.load_model("toy", config=config)
    prompt = "狐" * MAX_TEXT_CHARS  # non-ASCII: the worst case for the ASCII JSON embedded in the file
    model.generate(prompt, seed=1, output_dir=tmp_path / "out")
    [path] = _pngs(tmp_path / "out")
    assert path.stat().st_size < 1_000_000  # measured 0.59 MB (JSON with \\u escapes + the A1111 text)
    assert read_settings(path)["prompt"] == prompt
    with pytest.raises(SettingsError, match="'negative_prompt' is 65,537 characters"):
        model.generate(prompt, negative_prompt="x" * (MAX_TEXT_CHARS + 1))


def test_oversized_embedded_settings_are_refused(tmp_path: Path) -> None:
    meta = PngImagePlugin.PngInfo()
    meta.add_itxt("wgp_settings", '{"model_type": "toy", "prompt": "' + "x" * MAX_EMBEDDED_CHARS + '"}')
    path = tmp_path / "big.png"
    Image.new("RGB", (16, 16)).save(path, pnginfo=meta)
    with pytest.raises(SettingsError, match="more than any image this program saves"):
        read_settings(path)


def test_token_counter_does_not_tokenize_a_huge_paste(tiny_flat_layout: dict[str, Path]) -> None:
    folder = tiny_flat_layout["tokenizer"]
    folder = folder if folder.is_dir() else folder.parent
    assert count_tokens("a fox", folder, 512).exact  # this folder's tokenizer works
    start = time.perf_counter()
    count = count_tokens("a red fox " * 1_000_000, folder, 512)  # 10 MB
    assert time.perf_counter() - start < 1
    assert not count.exact and count.too_long_chars == 10_000_000
    assert "too long: 10,000,000 characters" in count.markdown() and f"{MAX_TEXT_CHARS:,}" in count.markdown()


# -- item 7: destinations ---------------------------------------------------------------------------


def test_output_that_is_an_existing_folder_saves_inside_it(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    folder = tmp_path / "some" / "dir"
    folder.mkdir(parents=True)
    assert cli.main([*cli_args(config), "--model", "toy", "--prompt", "fox", "--output", f"{folder}/"]) == 0
    assert cli.main([*cli_args(config), "--model", "toy", "--prompt", "owl", "--output", str(folder)]) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and all(n.endswith(".png") for n in names) and any("owl" in n for n in names)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["dir"]  # nothing written beside it
    new = tmp_path / "new_folder"
    assert cli.main([*cli_args(config), "--model", "toy", "--prompt", "cat", "--output", f"{new}/"]) == 0
    assert [p.suffix for p in new.iterdir()] == [".png"]


def _toy_loads(config: HostConfig) -> list[Any]:
    """The toy family's log of load_model calls (the module discovery imported for this models folder)."""
    return sys.modules[type(Session(config).registry.handler_for("toy")).__module__].LOADS


def test_output_dir_that_is_a_file_fails_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = toy_env(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    tasks = write_json(tmp_path / "tasks.json", [{"model_type": "toy"}])
    argv = [*cli_args(config), "--process", str(tasks), "--output-dir", str(blocker)]
    loads_before = len(_toy_loads(config))
    assert cli.main(argv) == 1
    out = capsys.readouterr()
    assert f"error: output folder {blocker} is a file" in out.err
    assert len(_toy_loads(config)) == loads_before and "[1/1]" not in out.out  # nothing loaded or generated
    inside = [*cli_args(config), "--model", "toy", "--prompt", "x", "--output", str(blocker / "a.png")]
    assert cli.main(inside) == 1
    assert "is a file" in capsys.readouterr().err


def test_api_output_dir_is_checked_before_generating(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    model = wgp.load_model("toy", config=config)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(SettingsError, match="is a file"):
        model.generate("x", output_dir=blocker)
    assert model.last_result is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_dir_fails_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = toy_env(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert cli.main([*cli_args(config), "--model", "toy", "--prompt", "x", "--output-dir", str(locked)]) == 1
    finally:
        locked.chmod(0o755)
    assert f"cannot write images into {locked}" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_folder_nobody_can_write_fails_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/proc/self is a folder that refuses new files even to root: the real write of the check sees it."""
    config = toy_env(tmp_path)
    tasks = write_json(tmp_path / "tasks.json", [{"model_type": "toy"}])
    loads_before = len(_toy_loads(config))
    assert cli.main([*cli_args(config), "--process", str(tasks), "--output-dir", "/proc/self"]) == 1
    out = capsys.readouterr()
    assert "error: cannot write images into /proc/self" in out.err
    assert len(_toy_loads(config)) == loads_before and "[1/1]" not in out.out


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_stale_temp_files_of_a_killed_run_are_removed_on_the_next_start(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    out = config.output_dir
    out.mkdir(parents=True)
    dead = _dead_pid()
    stale = [out / f".2026-01-01_00-00-00_seed1_fox.png.{dead}.tmp", out / f".defaults.json.{dead}-k3j_a9z1.tmp"]
    live = out / f".other.png.{os.getpid()}.tmp"  # a run still going (this process): never touched
    unrelated = [out / ".notes.tmp", out / "keep.png.123.tmp"]  # not hidden-with-pid names: not ours
    for path in [*stale, live, *unrelated]:
        path.write_bytes(b"partial")
    ckpt_stale = config.ckpts / f".hash_cache.json.{dead}-abcdefgh.tmp"
    ckpt_stale.write_bytes(b"{")
    assert cli.main([*cli_args(config), "--model", "toy", "--prompt", "x"]) == 0
    assert not any(p.exists() for p in stale) and not ckpt_stale.exists()
    assert live.exists() and all(p.exists() for p in unrelated)
    assert len(_pngs(out)) == 1
    assert remove_stale_temp_files(out) == []


def test_atomic_write_temp_names_carry_the_pid(tmp_path: Path) -> None:
    from host.atomic import atomic_write

    seen: list[str] = []
    atomic_write(tmp_path / "x.json", lambda tmp: (seen.append(tmp.name), tmp.write_text("{}")))
    assert seen[0].startswith(f".x.json.{os.getpid()}-") and seen[0].endswith(".tmp")


# -- item 11: width/height in the Python API ------------------------------------------------------------


def test_api_accepts_width_and_height(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    model = wgp.load_model("toy", config=config)
    assert model.generate("x", width=64, height=48)[0].size == (64, 48)
    assert model.generate("x", width=96)[0].size == (96, 32)  # height from the preset (32x32)
    assert model.last_result is not None and model.last_result.settings["resolution"] == "96x32"
    wide = wgp.load_model("toy", config=config, resolution="64x64")
    assert wide.generate("x", height=16)[0].size == (64, 16)  # the side not given comes from load_model's size
    with pytest.raises(SettingsError, match="'width' must be a whole number of pixels"):
        model.generate("x", width=float("inf"), height=32)
    with pytest.raises(SettingsError, match="'resolution' is '64x64' but width/height say 32x32"):
        model.generate("x", resolution="64x64", width=32, height=32)


def test_width_and_height_work_for_z_image_tasks() -> None:
    [prepared] = prepare_tasks(Session(), [RawTask({"model_type": "z_image", "width": 768, "height": 512}, "t")])
    assert prepared.task is not None and prepared.task.settings["resolution"] == "768x512"


# -- item 12: presets of formats this program cannot load -----------------------------------------------

NUNCHAKU_FP4 = {  # Wan2GP's defaults/z_image_nunchaku_r128_fp4.json
    "model": {
        "name": "Z-Image Turbo Nunchaku FP4 (r128) 6B",
        "architecture": "z_image",
        "capabilities": {"live_preview": {"modes": ["tae"], "decoders": ["taef1"]}},
        "description": "Nunchaku SVDQ FP4 weights for Z-Image Turbo.",
        "URLs": ["https://huggingface.co/DeepBeepMeep/Z-Image/resolve/main/svdq-fp4_r128-z-image-turbo.safetensors"],
    },
    "resolution": "1024x1024",
    "batch_size": 1,
    "num_inference_steps": 8,
    "guidance_scale": 0,
}


def _finetunes(tmp_path: Path) -> Path:
    folder = tmp_path / "finetunes"
    write_json(folder / "z_image_nunchaku_r128_fp4.json", NUNCHAKU_FP4)
    int4 = {"model": {**NUNCHAKU_FP4["model"], "URLs": ["https://example.org/svdq-int4_r256-z-image-turbo.safetensors"]}}
    del int4["model"]["capabilities"]  # a user's copy without Wan2GP's extra key
    write_json(folder / "z_image_nunchaku_r256_int4.json", int4)
    gguf = {"model": {"name": "GGUF", "architecture": "z_image", "URLs": ["/models/z_image_turbo-Q4_K_M.gguf"]}}
    write_json(folder / "z_image_gguf.json", gguf)
    return folder


def test_unloadable_formats_are_refused_at_start_up_naming_the_format(tmp_path: Path) -> None:
    catalog = load_presets(discover(), REPO / "defaults", _finetunes(tmp_path))
    assert {"z_image", "z_image_base"} <= set(catalog.presets)
    assert not {"z_image_nunchaku_r128_fp4", "z_image_nunchaku_r256_int4", "z_image_gguf"} & set(catalog.presets)
    fp4, int4, gguf = (catalog.skipped[k] for k in ("z_image_nunchaku_r128_fp4", "z_image_nunchaku_r256_int4", "z_image_gguf"))
    assert "'svdq-fp4_r128-z-image-turbo.safetensors' is Nunchaku SVDQuant fp4 weights, a format this program cannot load" in fp4
    assert "Nunchaku SVDQuant int4" in int4 and "is GGUF weights" in gguf
    with pytest.raises(PresetError, match="z_image_nunchaku_r128_fp4' is not usable: .*Nunchaku SVDQuant fp4"):
        catalog.get("z_image_nunchaku_r128_fp4")
    assert unloadable_format("ZImageTurbo_quanto_bf16_int8.safetensors") is None
    assert unloadable_format("/data/models/Z-Image-Turbo") is None


def test_skipped_preset_message_is_printed_once(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "wgp.py", "--list-models", "--finetunes-dir", str(_finetunes(tmp_path))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("z_image_nunchaku_r128_fp4.json") == 1, done.stderr
    assert done.stderr.count("z_image_nunchaku_r256_int4.json") == 1, done.stderr
    assert "nunchaku" not in done.stdout.lower() and "z_image_base" in done.stdout
