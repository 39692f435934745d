"""The settings schema a family declares (common/settings_schema.py) and what the host derives from it:
validation, defaults per architecture, image inputs read for the family and recorded by hash in saved images.

The toy family declares `toy_image` (an image input), `toy_mix` and `toy_invert`, which appear nowhere in host/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import wgp
from common.errors import SettingsError
from common.settings_schema import SettingSpec, convert
from host import cli, settings_doc
from host import settings as host_settings
from host.outputs import read_settings
from host.registry import DEFAULT_MODELS_ROOT, discover
from host.session import Session
from host.web.form import accepted_keys, form_fields, form_from_settings, settings_from_form
from tests.fixtures.host_env import cli_args, toy_env, write_json

REPO = Path(__file__).resolve().parents[1]

SIZE = SettingSpec("r", "size", "16x16", minimum=16, maximum=4096, multiple_of=16)


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        (SettingSpec("steps", "int", 8, minimum=1, maximum=1000), "8", 8),
        (SettingSpec("steps", "int", 8, minimum=1, maximum=1000), "8.0", 8),
        (SettingSpec("shift", "float", 3.0, minimum=0, exclusive_minimum=True), "2.5", 2.5),
        (SettingSpec("norm", "float", False, minimum=0, bool_as_number=True), True, 1.0),
        (SettingSpec("fmt", "choice", "png", choices=("png", "jpeg"), aliases=(("jpg", "jpeg"),)), "JPG", "jpeg"),
        (SettingSpec("profile", "choice", "auto", choices=("auto", 1, 2)), "2", 2),
        (SettingSpec("size", "size", "16x16", minimum=16, maximum=64, multiple_of=16), " 32 x 48 ", "32x48"),
        (SettingSpec("text", "text", ""), None, ""),
        (SettingSpec("flip", "bool", False), "true", True),
        (SettingSpec("start", "image", None, group="image"), "", None),
    ],
)
def test_conversion(spec: SettingSpec, value: Any, expected: Any) -> None:
    assert convert(spec, value) == expected


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (SettingSpec("seed", "int", -1), "inf", "'seed' must be a whole number (got 'inf')"),
        (SettingSpec("seed", "int", -1), True, "'seed' must be an integer (got True)"),
        (SettingSpec("g", "float", 0.0), float("nan"), "'g' must be a finite number (got nan)"),
        (SettingSpec("g", "float", 0.0, minimum=0, range_text=">= 0 (0: off)"), -1, "g must be >= 0 (0: off) (got -1)"),
        (SettingSpec("n", "int", 1, minimum=1, maximum=64), 65, "n must be between 1 and 64 (got 65)"),
        (SettingSpec("shift", "float", 1.0, minimum=0, exclusive_minimum=True), 0, "shift must be > 0 (got 0)"),
        (SettingSpec("fmt", "choice", "png", choices=("png", "jpeg", "webp")), "gif", "'fmt' must be png, jpeg or webp, got 'gif'"),
        (SettingSpec("q", "choice", "int8", "weights", choices=("int8", "bf16")), 8, "'q' must be str (weights), got 8"),
        (SIZE, "1000x512", "width must be a multiple of 16 (got 1000); nearest valid sizes: 992 or 1008"),
        (SIZE, "512x8192", "height must be between 16 and 4096"),
        (SettingSpec("r", "size", "16x16"), "big", "r must look like '1024x768'"),
        (SettingSpec("p", "text", ""), 3, "'p' must be text (got int)"),
        (SettingSpec("l", "list", [], "LoRA names"), "a.safetensors", "'l' must be list (LoRA names)"),
        (SettingSpec("flip", "bool", False), "maybe", "'flip' must be true or false"),
        (SettingSpec("start", "image", None, group="image"), 5, "'start' must be the path of an image file"),
    ],
)
def test_refusals_name_the_setting(spec: SettingSpec, value: Any, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        convert(spec, value)
    assert message in str(info.value)


def test_malformed_declarations_are_refused() -> None:
    with pytest.raises(ValueError, match="kind 'number' is not one of"):
        SettingSpec("x", "number")
    with pytest.raises(ValueError, match="group 'extra' is not one of"):
        SettingSpec("x", "int", group="extra")
    with pytest.raises(ValueError, match="a choice needs its choices"):
        SettingSpec("x", "choice")


# -- Z-Image's schema: today's settings, defaults per architecture and ranges ---------------------------


ZIMAGE_TURBO = {
    "prompt": "",
    "negative_prompt": "",
    "resolution": "1024x1024",
    "num_inference_steps": 8,
    "guidance_scale": 0.0,
    "flow_shift": 3.0,
    "seed": -1,
    "batch_size": 1,
    "cfg_normalization": False,
    "cfg_truncation": 1.0,
    "NAG_scale": 1.0,  # NAG, the sampler and seed variety (issue 11 items 4-6)
    "NAG_tau": 3.5,
    "NAG_alpha": 0.5,
    "sample_solver": "default",
    "seed_variety": 0.0,
    "seed_variety_steps": 2,
    "max_sequence_length": 512,
    "image_start": None,  # image-to-image and inpainting (issue 11 item 1)
    "image_mask": None,
    "denoising_strength": 0.6,
}


def test_z_image_declares_todays_settings_with_each_architectures_defaults() -> None:
    from models.z_image.z_image_handler import BASE_NEGATIVE_PROMPT, family_handler

    turbo = host_settings.family_defaults(family_handler, "z_image", {})
    assert list(turbo.items()) == list(ZIMAGE_TURBO.items())  # same keys, values and order as before the schema
    base = host_settings.family_defaults(family_handler, "z_image_base", {})
    expected = {**ZIMAGE_TURBO, "num_inference_steps": 30, "guidance_scale": 4.0, "flow_shift": 6.0}
    assert base == {**expected, "negative_prompt": BASE_NEGATIVE_PROMPT}
    specs = {s.name: s for s in family_handler.query_settings_schema("z_image")}
    assert (specs["num_inference_steps"].flag_name, specs["guidance_scale"].flag_name) == ("--steps", "--guidance")
    assert (specs["max_sequence_length"].minimum, specs["max_sequence_length"].maximum) == (1, 1024)


def test_z_image_tasks_checked_by_the_schema_keep_their_messages() -> None:
    session = Session()  # the shipped presets; validation only
    cases = {
        "num_inference_steps": (0, "num_inference_steps must be between 1 and 1000 (got 0)"),
        "guidance_scale": (-1, "guidance_scale must be >= 0 (0 turns guidance off) (got -1)"),
        "flow_shift": ("inf", "'flow_shift' must be a finite number (got 'inf')"),
        "cfg_truncation": (-0.5, "cfg_truncation must be >= 0 (values >= 1 never truncate) (got -0.5)"),
        "resolution": ("1000x1024", "width must be a multiple of 16 (got 1000); nearest valid sizes: 992 or 1008"),
        "guidance": (3, "unknown setting 'guidance'; did you mean 'guidance_scale'?"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(SettingsError) as info:
            session.prepare({"model_type": "z_image", "prompt": "x", key: value}, "t.json[0]")
        assert str(info.value) == f"t.json[0]: {message}"


# -- a setting the host never heard of: the toy family's ----------------------------------------------


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(toy_env(tmp_path))


def _picture(path: Path, colour: tuple[int, int, int] = (200, 10, 60), size: tuple[int, int] = (32, 32)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"toy_mix": 2}, "toy_mix must be between 0 and 1 \\(got 2\\)"),
        ({"toy_mix": "nan"}, "'toy_mix' must be a finite number"),
        ({"toy_invert": "maybe"}, "'toy_invert' must be true or false"),
        ({"toy_mxi": 0.5}, "unknown setting 'toy_mxi'; did you mean 'toy_mix'"),
        ({"toy_image": "nowhere/start.png"}, "'toy_image': image file 'nowhere/start.png' not found"),
    ],
)
def test_family_settings_are_validated_from_the_schema(session: Session, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        session.prepare({"model_type": "toy", **extra}, "tasks.json[1]")
    assert str(info.value).startswith("tasks.json[1]: ")


def test_an_input_that_is_not_an_image_is_refused_naming_the_setting(session: Session, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(SettingsError, match=f"'toy_image': {text} is not a readable image"):
        session.prepare({"model_type": "toy", "toy_image": str(text)})


def test_family_settings_get_their_defaults_and_converted_values(session: Session) -> None:
    task = session.prepare({"model_type": "toy", "toy_mix": "0.25", "toy_invert": True})
    assert (task.settings["toy_mix"], task.settings["toy_invert"], task.settings["toy_image"]) == (0.25, True, None)
    assert session.prepare({"model_type": "toy"}).settings["toy_mix"] == 0.5


def test_image_input_reaches_the_family_and_the_saved_image_records_its_hash(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    start = _picture(tmp_path / "start.png")
    tasks = write_json(tmp_path / "tasks.json", [{"model_type": "toy", "seed": 1, "toy_image": str(start), "toy_mix": 1.0}])
    assert cli.main([*cli_args(config), "--process", str(tasks)]) == 0
    [saved] = sorted(config.output_dir.glob("*.png"))
    pixels = np.asarray(Image.open(saved))
    assert (pixels == (200, 10, 60)).all()  # mix 1: the family drew exactly the input picture
    embedded = read_settings(saved)
    assert embedded["toy_image"] == str(start.resolve()) and embedded["toy_mix"] == 1.0
    digest = hashlib.sha256(start.read_bytes()).hexdigest()
    assert embedded["generation_info"]["inputs"] == {"toy_image": {"name": "start.png", "sha256": digest}}
    again = tmp_path / "again"
    assert cli.main([*cli_args(config), "--output-dir", str(again), "--process", str(saved)]) == 0
    [second] = again.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(second)), pixels)


def test_images_without_inputs_record_none(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    assert cli.main([*cli_args(config), "--model", "toy", "--prompt", "plain"]) == 0
    [saved] = config.output_dir.glob("*.png")
    embedded = read_settings(saved)
    assert embedded["toy_image"] is None and "inputs" not in embedded["generation_info"]


def test_api_takes_a_pil_image_or_a_path(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    model = wgp.load_model("toy", config=config)
    picture = Image.new("RGB", (32, 32), (5, 250, 90))
    [image] = model.generate("x", seed=3, toy_image=picture, toy_mix=1.0, output_dir=tmp_path / "out")
    assert (np.asarray(image) == (5, 250, 90)).all()
    [saved] = (tmp_path / "out").glob("*.png")
    data = json.loads(Image.open(saved).info["wgp_settings"])
    pixels = hashlib.sha256(b"RGB:32x32:" + picture.tobytes()).hexdigest()
    assert data["toy_image"] is None  # an in-memory image cannot be written as a path; its hash is kept
    assert data["generation_info"]["inputs"]["toy_image"]["pixels_sha256"] == pixels
    path = _picture(tmp_path / "blue.png", (0, 0, 255))
    [image] = model.generate("x", seed=3, toy_image=str(path), toy_mix=1.0, toy_invert=True)
    assert (np.asarray(image) == (255, 255, 0)).all()


# -- command-line flags from the schemas ---------------------------------------------------------------

OLD_FLAGS = [  # every one-shot flag the CLI had before the schema, with the setting it sets
    ("--prompt", "a fox", "prompt", "a fox"),
    ("--negative-prompt", "blur", "negative_prompt", "blur"),
    ("--seed", "3", "seed", 3),
    ("--steps", "5", "num_inference_steps", 5),
    ("--guidance", "1.5", "guidance_scale", 1.5),
    ("--flow-shift", "2", "flow_shift", 2.0),
    ("--resolution", "64x32", "resolution", "64x32"),
    ("--batch-size", "2", "batch_size", 2),
    ("--quantization", "bf16", "quantization", "bf16"),
    ("--attention", "sdpa", "attention", "sdpa"),
    ("--profile", "4", "profile", "4"),
    ("--output-format", "webp", "output_format", "webp"),
]


def test_every_existing_flag_still_sets_its_setting(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    argv = [*cli_args(config), "--model", "toy"] + [part for flag, value, _, _ in OLD_FLAGS for part in (flag, value)]
    session, args = cli.session_from_args(argv)
    expected = {key: value for _, _, key, value in OLD_FLAGS}
    assert cli._one_shot_settings(session, args) == expected


def test_z_image_flags_include_its_advanced_settings() -> None:
    parser = cli.build_parser(Session())  # the shipped families
    args = parser.parse_args(["--model", "z_image", "--cfg-normalization", "1", "--cfg-truncation", "0.5", "--max-tokens", "256"])
    assert (args.cfg_normalization, args.cfg_truncation, args.max_tokens) == (1.0, 0.5, 256)
    with pytest.raises(SystemExit):  # refused by argparse as before: exit 2 with "invalid int value: 'inf'"
        parser.parse_args(["--seed", "inf"])


def test_a_family_setting_gets_its_flag_with_no_host_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = toy_env(tmp_path)
    start = _picture(tmp_path / "start.png", (1, 2, 3))
    with pytest.raises(SystemExit):
        cli.main([*cli_args(config), "--help"])
    usage = capsys.readouterr().out
    assert "--toy-image PATH" in usage and "--toy-mix X" in usage and "--toy-invert, --no-toy-invert" in usage
    flags = ["--model", "toy", "--prompt", "p", "--toy-image", str(start), "--toy-mix", "1", "--toy-invert"]
    assert cli.main([*cli_args(config), *flags]) == 0
    [saved] = config.output_dir.glob("*.png")
    assert (np.asarray(Image.open(saved)) == (254, 253, 252)).all()  # the picture, inverted
    embedded = read_settings(saved)
    assert (embedded["toy_image"], embedded["toy_mix"], embedded["toy_invert"]) == (str(start.resolve()), 1.0, True)
    assert embedded["generation_info"]["inputs"]["toy_image"]["sha256"] == hashlib.sha256(start.read_bytes()).hexdigest()
    assert cli.main([*cli_args(config), "--model", "toy", "--prompt", "p", "--toy-mix", "2"]) == 1
    assert "toy_mix must be between 0 and 1 (got 2)" in capsys.readouterr().err


# -- the README's settings tables ------------------------------------------------------------------------


def test_readme_settings_tables_are_current() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    tables = settings_doc.settings_tables(discover(DEFAULT_MODELS_ROOT))
    assert "| `num_inference_steps` | `--steps` | integer | `8` (`z_image`), `30` (`z_image_base`), `8` (`z_image_control`)" in tables
    current = settings_doc.replace_between_markers(readme, tables, "README.md")
    assert current == readme, "the README's settings tables are stale: run `python -m host.settings_doc --write README.md`"


def test_docs_tables_list_a_family_setting_the_host_never_heard_of(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    tables = settings_doc.settings_tables(discover(config.models_root))
    assert "Toy family (`toy`, `toy_plus`):" in tables
    assert "| `toy_image` | `--toy-image` | image file (path) |  |  | yes | a picture blended into the noise (only `toy`) |" in tables
    assert "| `toy_mix` | `--toy-mix` | number | `0.5` | between 0 and 1 | yes |" in tables
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{settings_doc.START}\nold\n{settings_doc.END}\nrest\n")
    assert settings_doc.main(["--write", str(readme), "--models-root", str(config.models_root)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "\nold\n" not in text and "`toy_invert`" in text


# -- the web form from the schemas -------------------------------------------------------------------

OLD_FORM = (  # host/web_form.py FORM_FIELDS before the schema: the Z-Image page's inputs, in page order
    "model prompt negative_prompt width height steps guidance flow_shift seed batch_size cfg_normalization "
    "cfg_truncation nag_scale nag_tau nag_alpha sample_solver seed_variety seed_variety_steps max_tokens image_start image_mask "
    "denoising_strength image_guide control_preprocess control_net_weight "
    "quantization profile attention output_format cache compile "
    "loras loras_multipliers"
).split()


def test_z_image_form_has_todays_fields_in_todays_order() -> None:
    fields = form_fields(Session().registry)
    assert [f.id for f in fields] == OLD_FORM
    assert {f.id: f.key for f in fields}["max_tokens"] == "max_sequence_length"


def test_a_family_setting_becomes_a_form_field_and_a_setting(tmp_path: Path) -> None:
    session = Session(toy_env(tmp_path))
    fields = form_fields(session.registry)
    ids = [f.id for f in fields]
    assert ids[ids.index("batch_size") + 1 : ids.index("quantization")] == ["toy_image", "toy_mix", "toy_invert"]
    kinds = {f.id: f.spec.kind for f in fields if f.spec is not None}
    assert (kinds["toy_image"], kinds["toy_mix"], kinds["toy_invert"]) == ("image", "float", "bool")
    start = _picture(tmp_path / "start.png")
    values = {"model": "toy", "width": 40, "height": 32, "toy_image": str(start), "toy_mix": 1, "toy_invert": True}
    result = settings_from_form(values, fields, accepted_keys(session, session.catalog.get("toy")))
    assert result.settings["toy_image"] == str(start) and result.settings["toy_mix"] == 1.0
    assert result.settings["resolution"] == "48x32" and result.notes == ["snapped to multiples of 16: width 40 -> 48"]
    task = session.prepare({**result.settings, "model_type": "toy"}, "web UI")
    assert task.settings["toy_invert"] is True
    back = form_from_settings({"toy_image": str(start), "toy_mix": 0.3, "resolution": "64x16"}, fields)
    assert back == {"toy_image": str(start), "toy_mix": 0.3, "width": 64, "height": 16}
    assert form_from_settings({"toy_image": str(tmp_path / "gone.png")}, fields) == {}  # a file no longer there


def test_the_form_shows_only_the_settings_the_model_type_takes(tmp_path: Path) -> None:
    from host.web.events import WebApp

    plus = {"model": {"name": "Toy plus", "architecture": "toy_plus", "URLs": ["toy/toy_bf16.safetensors"]}}
    app = WebApp(Session(toy_env(tmp_path, presets={"toy_plus": plus})), None)
    app.c = {name: name for name in [*app.field_ids, "status", "family", "resolution", "panel_image", "model"]}
    toy, toy_plus = app.on_model_input("toy"), app.on_model_input("toy_plus")
    assert toy["toy_image"]["visible"] and toy["toy_mix"]["visible"] and toy["panel_image"]["visible"]
    assert not toy_plus["toy_image"]["visible"] and not toy_plus["toy_mix"]["visible"]
    assert not toy_plus["panel_image"]["visible"] and toy_plus["toy_invert"]["visible"]
    assert toy["toy_mix"]["value"] == 0.5 and toy["steps"]["value"] == 3
