"""Host side of LoRAs: folders, file checks, load reports, multiplier syntax, .lset files, the seam."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lora_fixtures import DIALECTS, NORMALIZER, random_lora, tiny_model
from safetensors.torch import save_file

from common.errors import CheckpointError, SettingsError
from common.model_hooks import ModelHooks
from host.lora import (
    LoraLibrary,
    apply_loras,
    load_lora,
    lora_root,
    parse_multipliers,
    read_lora_file,
    register_lora_root_arg,
    resolve_lora,
)
from host.lora.apply import linear_shapes
from host.lora.sets import LoraSet, list_lsets, load_lset, save_lset


def _save(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


def test_library_lists_recursively_and_rescans(tmp_path: Path) -> None:
    (tmp_path / "styles").mkdir()
    for name in ("a.safetensors", "styles/b.sft", "notes.txt", "old.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    library = LoraLibrary(tmp_path)
    assert library.files() == ["a.safetensors", "styles/b.sft"]
    (tmp_path / "styles" / "c.safetensors").write_bytes(b"x")
    assert library.files() == ["a.safetensors", "styles/b.sft"]  # cached until asked
    assert library.rescan() == ["a.safetensors", "styles/b.sft", "styles/c.safetensors"]
    assert LoraLibrary(tmp_path / "missing").files() == []


def test_root_folder_flag() -> None:
    parser = argparse.ArgumentParser()
    register_lora_root_arg(parser)
    assert lora_root(parser.parse_args(["--loras", "/data/loras"])) == Path("/data/loras")
    assert lora_root(parser.parse_args([])).name == "loras"


def test_resolve_inside_folders_only(tmp_path: Path) -> None:
    family, root = tmp_path / "loras" / "z_image", tmp_path / "loras"
    (family / "sub").mkdir(parents=True)
    (family / "sub" / "x.safetensors").write_bytes(b"x")
    (root / "y.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    assert resolve_lora("sub/x.safetensors", [family, root]) == (family / "sub" / "x.safetensors").resolve()
    assert resolve_lora("y.safetensors", [family, root]) == (root / "y.safetensors").resolve()
    with pytest.raises(CheckpointError, match="outside the LoRA folder"):
        resolve_lora("../../outside.safetensors", [family])
    assert resolve_lora(tmp_path / "outside.safetensors", [family]) == tmp_path / "outside.safetensors"  # user's path
    with pytest.raises(CheckpointError, match="not found in"):
        resolve_lora("nope.safetensors", [family, root])


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_files_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"old{suffix}"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="pickle format.*can run arbitrary code.*Convert it to .safetensors"):
        read_lora_file(path)
    with pytest.raises(CheckpointError, match="pickle"):
        resolve_lora(path.name, [tmp_path])


def test_truncated_file_names_the_file(tmp_path: Path, model) -> None:
    path = _save(tmp_path / "cut.safetensors", DIALECTS["musubi"](random_lora(model)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors could not be read.*truncated"):
        read_lora_file(path)
    path.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_lora_file(path)


def test_each_failure_has_its_own_message(tmp_path: Path, model) -> None:
    lora = DIALECTS["ai-toolkit"](random_lora(model))
    lora["diffusion_model.layers.0.foo.weight"] = torch.zeros(2)
    unmatched = _save(tmp_path / "unmatched.safetensors", lora)
    flux = _save(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.proj.lora_A.weight": torch.zeros(2, 2)})
    messages = []
    for path in (unmatched, flux):
        with pytest.raises(CheckpointError) as err:
            load_lora(path, NORMALIZER, linear_shapes(model))
        messages.append(str(err.value))
    assert messages[0].startswith(
        "LoRA unmatched.safetensors: 1 LoRA key(s) do not map to Z-Image: 'diffusion_model.layers.0.foo.weight'"
    )
    assert messages[1].startswith("LoRA flux.safetensors: this LoRA is for Flux")


def test_load_report(tmp_path: Path, model) -> None:
    sd = DIALECTS["musubi"](random_lora(model, rank=4))
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    loaded = load_lora(_save(tmp_path / "style.safetensors", sd), NORMALIZER, linear_shapes(model))
    r = loaded.report
    assert (r.name, r.dialect, r.rank, r.ranks, r.alpha, r.scale, r.dora) == (
        "style.safetensors", "musubi/kohya", 4, [4], 2.0, 0.5, False
    )
    assert r.modules_matched == len(linear_shapes(model)) and r.kinds == {"lora": r.modules_matched}
    assert list(r.not_applied) == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert "musubi/kohya" in r.summary() and "1 key(s) not applied" in r.summary()
    assert r.to_dict()["modules_matched"] == r.modules_matched
    path = _save(tmp_path / "a.safetensors", DIALECTS["ai-toolkit"](random_lora(model)))
    no_alpha = load_lora(path, NORMALIZER).report
    assert (no_alpha.alpha, no_alpha.scale) == (None, 1.0)


def test_multiplier_syntax() -> None:
    assert parse_multipliers("1.0 0.5", 2) == [[1.0], [0.5]]
    text = "# first the style\n0.8\n# then a fading detail LoRA\n1,0.5,0"
    assert parse_multipliers(text, 2) == [[0.8], [1.0, 0.5, 0.0]]
    assert parse_multipliers("", 2) == [[1.0], [1.0]]
    assert parse_multipliers([0.7, "1,0"], 2) == [[0.7], [1.0, 0.0]]
    with pytest.raises(SettingsError, match="3 values for 2 LoRA"):
        parse_multipliers("1 1 1", 2)
    with pytest.raises(SettingsError, match="'abc' is not a number"):
        parse_multipliers("abc", 1)


def test_lset_round_trip_and_validation(tmp_path: Path) -> None:
    lset = LoraSet(["style.safetensors", "sub/detail.safetensors"], "0.8 1,0.5", "a portrait")
    path = save_lset(tmp_path, "portrait", lset)
    assert path == tmp_path / "portrait.lset" and list_lsets(tmp_path) == ["portrait.lset"]
    assert load_lset(path) == lset
    path.write_text('{"loras": ["a.safetensors"], "loras_mult": 1}')
    with pytest.raises(SettingsError, match="'loras_mult' must be a str"):
        load_lset(path)
    path.write_text('{"loras": [], "colour": "red"}')
    with pytest.raises(SettingsError, match="unknown field 'colour'"):
        load_lset(path)
    with pytest.raises(SettingsError, match="plain file name"):
        save_lset(tmp_path, "../escape", lset)


class _FakeModel:
    """A LoadedModel: a `transformer`, `hooks`, and a generate(settings, on_step) that calls the step hook."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.hooks = ModelHooks()
        self.steps_seen: list[list[float]] = []
        self.runtime = None

    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer}

    def generate(self, settings, on_step=None):
        total = settings["steps"]
        for step in range(total):
            self.hooks.before_step(step, total)
            self.steps_seen.append(list(self.runtime.multipliers))
            if on_step is not None:
                on_step(SimpleNamespace(step=step + 1, total=total, elapsed_s=0.0))
        return "done"

    def release(self) -> None:
        pass


def test_seam_follows_the_step_hook_for_schedules(tmp_path: Path, model) -> None:
    fake = _FakeModel(model)
    a = _save(tmp_path / "a.safetensors", DIALECTS["ai-toolkit"](random_lora(model)))
    b = _save(tmp_path / "b.safetensors", DIALECTS["diffsynth"](random_lora(model, seed=4)))
    events = []
    loras = apply_loras(fake, [a, b], "0.5 1,0", normalizer=NORMALIZER)
    fake.runtime = loras.runtime
    assert fake.generate({"steps": 4}, events.append) == "done"
    assert fake.steps_seen == [[0.5, 1.0], [0.5, 1.0], [0.5, 0.0], [0.5, 0.0]]
    assert len(events) == 4  # the host's own callback still runs
    assert [r.multiplier for r in loras.reports] == ["0.5", "1,0"]
    assert fake.generate.__func__ is _FakeModel.generate  # nothing of the model replaced
    loras.remove(fake)
    assert loras.runtime is None and fake.hooks.owners() == {}
    assert all(not m._forward_hooks for m in model.modules())


def test_schedules_need_a_model_with_step_hooks(tmp_path: Path, model) -> None:
    """A model without hooks takes constant multipliers only, and says why otherwise."""
    bare = SimpleNamespace(transformer=model)
    a = _save(tmp_path / "a.safetensors", DIALECTS["ai-toolkit"](random_lora(model)))
    with pytest.raises(SettingsError, match="step hooks"):
        apply_loras(bare, [a], "1,0", normalizer=NORMALIZER)
    apply_loras(bare, [a], "0.7", normalizer=NORMALIZER).remove(bare)


def test_seam_finds_the_family_normalizer(tmp_path: Path, tiny_diffusers_folder: Path) -> None:
    """Without an explicit normaliser the seam asks the family that built the model (discovered)."""
    from models.z_image.pipeline_z_image import LoadOptions, ZImageComponents, ZImagePipeline

    components = ZImageComponents.from_diffusers_folder(tiny_diffusers_folder)
    pipe = ZImagePipeline.from_components(components, LoadOptions(dtype=torch.float32))
    path = _save(tmp_path / "a.safetensors", DIALECTS["musubi"](random_lora(pipe.transformer)))
    loras = apply_loras(pipe, [path], "1")
    assert loras.reports[0].dialect == "musubi/kohya"
    loras.remove(pipe)
