"""LoRAs through the host session, end to end on the tiny Z-Image model: swapping LoRAs on loaded weights,
preset-level LoRAs before the task's, per-step schedules on the transformer's call log, `.lset` task key,
reports in the CLI / API / saved image, and bad LoRAs failing only their task."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from lora_fixtures import DIALECTS, random_lora
from PIL import Image
from safetensors.torch import save_file

import wgp
from host import cli
from host import lora as host_lora
from host.lora.sets import LoraSet, save_lset
from host.session import Destination, HostConfig, Session
from models.z_image import loading_z_image  # noqa: F401  (the engine must import: a broken one fails, never skips)

STEPS = 4
PRESET = {  # fp32: the image comparisons below are exact
    "model": {"name": "Tiny (diffusers folder)", "architecture": "z_image", "URLs": []},
    "prompt": "a fox",
    "resolution": "64x64",
    "num_inference_steps": STEPS,
    "guidance_scale": 0.0,
    "quantization": "fp32",
    "seed": 1,
}


def _write_lora(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_diffusers_folder: Path) -> HostConfig:
    """A `tiny` finetune on the tiny diffusers folder, `tiny_fast` with a preset LoRA, and LoRA files."""
    from models.z_image.tiny_z_image import TINY_CONFIG
    from models.z_image.transformer_z_image import ZImageTransformer

    root = tmp_path_factory.mktemp("lora_session")
    finetunes, loras = root / "finetunes", root / "loras"
    finetunes.mkdir()
    tiny = {**PRESET, "model": {**PRESET["model"], "URLs": [str(tiny_diffusers_folder)]}}
    (finetunes / "tiny.json").write_text(json.dumps(tiny))
    fast = {**tiny, "model": {**tiny["model"], "loras": ["distill.safetensors"], "loras_multipliers": "# fade out\n1,0"}}
    (finetunes / "tiny_fast.json").write_text(json.dumps(fast))
    with torch.device("meta"):
        shapes_only = ZImageTransformer(TINY_CONFIG)
    family = loras / "z_image"
    _write_lora(family / "style.safetensors", DIALECTS["ai-toolkit"](random_lora(shapes_only, seed=2)))
    _write_lora(family / "detail.safetensors", DIALECTS["musubi"](random_lora(shapes_only, seed=3)))
    _write_lora(family / "distill.safetensors", DIALECTS["diffsynth"](random_lora(shapes_only, seed=4)))
    _write_lora(loras / "root_only.safetensors", DIALECTS["peft"](random_lora(shapes_only, seed=5)))
    unmatched = DIALECTS["ai-toolkit"](random_lora(shapes_only, seed=6))
    unmatched["diffusion_model.layers.0.foo.weight"] = torch.zeros(2)
    _write_lora(family / "unmatched.safetensors", unmatched)
    _write_lora(family / "flux.safetensors", {"double_blocks.0.img_attn.proj.lora_A.weight": torch.zeros(2, 2)})
    cut = _write_lora(family / "cut.safetensors", DIALECTS["ai-toolkit"](random_lora(shapes_only, seed=7)))
    cut.write_bytes(cut.read_bytes()[:-100])
    torch.save({"a": torch.zeros(1)}, family / "old.pt")
    return HostConfig(
        finetunes_dir=finetunes,
        ckpts=root / "ckpts",
        output_dir=root / "outputs",
        allow_download=False,
        device="cpu",
        lora_args=argparse.Namespace(loras=loras),
    )


@pytest.fixture
def session(env: HostConfig, monkeypatch: pytest.MonkeyPatch) -> Iterator[Session]:
    """A session whose family normaliser is passed in: rediscovering it would fail here."""

    def no_rediscovery(model: object) -> None:
        raise AssertionError("the session must pass the family handler as the normaliser")

    monkeypatch.setattr(host_lora, "_find_normalizer", no_rediscovery)
    session = Session(env)
    yield session
    session.release()


def _count_loads(session: Session, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    handler = session.handler(session.catalog.get("tiny"))
    calls: list[str] = []
    load_model = handler.load_model

    def counting(model_type: str, *args: object) -> object:
        calls.append(model_type)
        return load_model(model_type, *args)

    monkeypatch.setattr(handler, "load_model", counting)
    return calls


def _pixels(session: Session, **settings: object) -> bytes:
    result = session.run(session.prepare({"model_type": "tiny", **settings}))
    return result.images[0].tobytes()


def test_other_loras_reuse_the_weights_and_removing_them_gives_the_original_image(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = _count_loads(session, monkeypatch)
    original = _pixels(session)
    styled = _pixels(session, activated_loras=["style.safetensors"])
    half = _pixels(session, activated_loras=["style.safetensors"], loras_multipliers="0.5")
    both = _pixels(session, activated_loras=["style.safetensors", "detail.safetensors"], loras_multipliers="0.5 1")
    assert len({original, styled, half, both}) == 4
    assert _pixels(session) == original  # LoRAs detached: the exact original image
    assert _pixels(session, activated_loras=["style.safetensors"]) == styled
    assert loads == ["z_image"]  # one load of the weights for all of it


def test_names_resolve_in_the_family_folder_then_the_root(session: Session) -> None:
    task = session.prepare({"model_type": "tiny", "activated_loras": ["style.safetensors", "root_only.safetensors"]})
    root = session.config.lora_args.loras
    assert task.loras.paths == ((root / "z_image" / "style.safetensors").resolve(), (root / "root_only.safetensors").resolve())


def test_preset_loras_come_first_and_schedules_reach_the_transformer(session: Session) -> None:
    task = session.prepare({"model_type": "tiny_fast", "activated_loras": ["style.safetensors"], "loras_multipliers": "0.5"})
    assert task.loras.names == ("distill.safetensors", "style.safetensors")
    assert task.loras.multipliers == ("1.0,0.0", "0.5")  # each group keeps its own; the preset's comment line is dropped
    model, _ = session.model_for(task, session.files_for(task))
    seen: list[list[float]] = []
    runtime = session.transform("loras").runtime
    hook = model.transformer.register_forward_pre_hook(lambda *_: seen.append(list(runtime.multipliers)))
    try:
        result = session.run(task)
    finally:
        hook.remove()
    assert seen == [[1.0, 0.5], [1.0, 0.5], [0.0, 0.5], [0.0, 0.5]]  # "1,0" over 4 steps: 1.0 for steps 1-2, 0 for 3-4
    assert [r["multiplier"] for r in result.lora_reports] == ["1,0", "0.5"]
    assert result.info["loras"] == {"distill.safetensors": "1.0,0.0", "style.safetensors": "0.5"}


def test_lset_key_expands_into_explicit_loras(session: Session) -> None:
    folder = session.lora_folders(session.catalog.get("tiny"))[0]
    save_lset(folder, "portrait", LoraSet(["style.safetensors", "detail.safetensors"], "# style\n0.8", "a portrait"))
    raw = {"model_type": "tiny", "lset": "portrait", "activated_loras": ["root_only.safetensors"], "loras_multipliers": "0.3"}
    task = session.prepare(raw)
    assert "lset" not in task.settings  # a saved image names every LoRA, so it regenerates without the set
    assert task.settings["activated_loras"] == ["style.safetensors", "detail.safetensors", "root_only.safetensors"]
    assert task.settings["loras_multipliers"] == "0.8 1.0 0.3"
    assert session.prepare(task.settings).loras == task.loras


def test_reports_in_the_api_and_the_saved_image(env: HostConfig, tmp_path: Path) -> None:
    model = wgp.load_model("tiny", config=env, activated_loras=["style.safetensors"], loras_multipliers="0.7")
    try:
        [report] = model.lora_reports  # known at load time, before any image
        assert (report["name"], report["dialect"], report["multiplier"]) == ("style.safetensors", "ai-toolkit/ComfyUI", "0.7")
        model.generate(output_dir=tmp_path)
    finally:
        wgp.release_model()
    [path] = list(tmp_path.glob("*.png"))
    info = json.loads(Image.open(path).info["wgp_settings"])["generation_info"]
    assert info["loras"] == {"style.safetensors": "0.7"}
    [saved] = info["lora_reports"]
    assert saved["modules_matched"] == report["modules_matched"] > 0 and len(saved["sha256"]) == 64
    assert "Lora: style.safetensors:0.7" in Image.open(path).info["parameters"]


def test_cli_prints_reports_and_a_bad_lora_fails_only_its_task(
    env: HostConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = [
        {"model_type": "tiny", "prompt": "plain"},
        {"model_type": "tiny", "prompt": "styled", "activated_loras": ["style.safetensors"], "loras_multipliers": "0.8"},
        {"model_type": "tiny", "activated_loras": ["unmatched.safetensors"]},
        {"model_type": "tiny", "activated_loras": ["flux.safetensors"]},
        {"model_type": "tiny", "activated_loras": ["cut.safetensors"]},
        {"model_type": "tiny", "activated_loras": ["old.pt"]},
        {"model_type": "tiny", "prompt": "plain"},
    ]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(tasks))
    out = tmp_path / "out"
    flags = ["--finetunes-dir", str(env.finetunes_dir), "--ckpts", str(env.ckpts), "--offline", "--device", "cpu"]
    flags += ["--loras", str(env.lora_args.loras), "--output-dir", str(out)]
    assert cli.main([*flags, "--process", str(path)]) == 1
    printed = capsys.readouterr()
    assert "LoRA style.safetensors [ai-toolkit/ComfyUI]: " in printed.out and "multiplier 0.8" in printed.out
    assert "3 of 7 task(s) succeeded" in printed.out
    assert f"FAILED {path}[2]: LoRA unmatched.safetensors: 1 LoRA key(s) do not map to Z-Image" in printed.err
    assert f"FAILED {path}[3]: LoRA flux.safetensors: this LoRA is for Flux" in printed.err
    assert f"FAILED {path}[4]: LoRA file " in printed.err and "cut.safetensors could not be read" in printed.err
    assert f"FAILED {path}[5]: activated_loras: old.pt: .pt is a pickle format" in printed.err
    before, after = sorted(out.glob("*plain*.png"))  # the same task, before and after the failures
    assert Image.open(before).tobytes() == Image.open(after).tobytes()  # nothing left attached by the failures


def test_one_run_does_everything_and_reports_its_phases(session: Session, tmp_path: Path) -> None:
    """Session.run: files, model, LoRAs, generation and saving in one call, the phases in order, the
    transforms it pushes for the run gone afterwards, and no method of the model replaced."""
    task = session.prepare({"model_type": "tiny", "activated_loras": ["style.safetensors"]})
    phases: list[tuple[str, dict]] = []
    result = session.run(task, on_phase=lambda p: phases.append((p.name, p.detail)), save_to=Destination(tmp_path))
    names = [name for name, _ in phases]
    assert names == ["files", "load", "loaded", "encode", "denoise", "decode", "save", "saved"]
    assert [r.name for r in dict(phases)["loaded"]["lora_reports"]] == ["style.safetensors"]
    assert dict(phases)["saved"]["paths"] == result.paths and all(p.is_file() for p in result.paths)
    model = session._loaded.model
    stack = session._loaded.transforms
    assert stack.names == [
        "int8", "packed_linears", "prompt_cache", "vae_tiling", "lean_decode", "black_image_guard", "heap_trim", "offload", "loras",
    ]
    assert "phase_reporter" not in str(model.hooks.owners())
    assert type(model).generate is model.generate.__func__ and type(model).encode_prompt is model.encode_prompt.__func__
    assert "generate" not in vars(model) and "release" not in vars(model)


@pytest.mark.isolated  # runs oneDNN's packed matmul (native code): a crash fails this test only
def test_packed_linears_carry_loras_and_stay_under_compile(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's packed linears (host/lowvram/packed_linear.py; MIN_FEATURES lowered to the tiny model's width):
    a task with a LoRA gives the dense layers' image within 1/255, and a task asking for `compile` keeps them
    packed (compiled code reaches them through the `wgp::packed_linear` op), the compile transform outermost."""
    import numpy as np

    from host.lowvram import packed_linear
    from host.lowvram.packed_linear import PackedLinear

    def image(**settings: object) -> np.ndarray:
        result = session.run(session.prepare({"model_type": "tiny", **settings}))
        return np.asarray(result.images[0]).astype(np.int16)

    dense = image(activated_loras=["style.safetensors"])
    session.release()
    monkeypatch.setattr(packed_linear, "MIN_FEATURES", 16)

    class NoCompile:  # stands in for CompileTransform: this test is about the order, not about compiling
        name, reversible, last_report = "compile", True, None

        def __init__(self, *args: object, **kwargs: object) -> None: ...
        def apply(self, model: object) -> None: ...
        def remove(self, model: object) -> None: ...

    monkeypatch.setattr("host.session.CompileTransform", NoCompile)

    def packed_layers() -> int:
        return sum(isinstance(m, PackedLinear) for m in session._loaded.model.transformer.modules())

    packed = image(activated_loras=["style.safetensors"])
    assert packed_layers() > 0 and np.abs(packed - dense).max() <= 1
    before = packed_layers()
    image(activated_loras=["style.safetensors"], compile=True)
    assert packed_layers() == before and session._loaded.transforms.names[-1] == "compile"
    assert np.abs(image(activated_loras=["style.safetensors"]) - dense).max() <= 1
    assert packed_layers() == before and "compile" not in session._loaded.transforms.names
