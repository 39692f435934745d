"""Z-Image family handler: what the host asks a family, answered for Z-Image (Turbo, Base, finetunes).

The host discovers this file and talks to `family_handler` only (host/registry.py FamilyHandler).
The engine is imported when a model is loaded, so discovery and settings checks stay light.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import CheckpointError, SettingsError
from common.model_facts import ModelFacts
from common.settings_schema import SettingSpec, with_defaults
from models.z_image.facts_z_image import FACTS, controlnet_facts, with_step_cache
from models.z_image.settings_z_image import SETTINGS, GenerationSettings
from models.z_image.settings_z_image_control import CONTROL_TYPES, CONTROL_VERSIONS, control_schema, split_control_settings

FAMILY = "z_image"
REPO_ROOT = Path(__file__).resolve().parents[2]
HF_BASE = "https://huggingface.co/DeepBeepMeep/Z-Image/resolve/main/"
DEFAULT_TEXT_ENCODER_URLS = [f"{HF_BASE}Qwen3/qwen3_bf16.safetensors", f"{HF_BASE}Qwen3/qwen3_quanto_bf16_int8.safetensors"]
DEFAULT_TRANSFORMER_URL = f"{HF_BASE}ZImageTurbo_bf16.safetensors"  # only its folder is used: the shared VAE
VAE_FILES = {"vae": "ZImageTurbo_VAE_bf16.safetensors", "vae_config": "ZImageTurbo_VAE_bf16_config.json"}
# Files next to the text encoder weights (the Qwen3/ folder): its config and the tokenizer.
TEXT_ENCODER_FILES = {
    "text_encoder_config": "config.json",
    "tokenizer": "tokenizer.json",
    "tokenizer_config": "tokenizer_config.json",
    "tokenizer_vocab": "vocab.json",
    "tokenizer_merges": "merges.txt",
}
# Each architecture's own defaults (REFERENCE.md sections 3-4), under a preset's values: a preset or
# finetune that names an architecture and no settings runs as that model is meant to run.
BASE_NEGATIVE_PROMPT = (
    "low quality, worst quality, blurry, pixelated, noisy, artifacts, watermark, text, logo, bad anatomy, "
    "bad hands, extra limbs"
)
ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "z_image": {"num_inference_steps": 8, "guidance_scale": 0.0, "flow_shift": 3.0, "negative_prompt": ""},
    "z_image_base": {
        "num_inference_steps": 30,
        "guidance_scale": 4.0,
        "flow_shift": 6.0,
        "negative_prompt": BASE_NEGATIVE_PROMPT,
    },
}
WEIGHT_SUFFIXES = {".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf"}


class ZImageHandler:
    """`family_handler` for models/z_image. `model_type` arguments are architectures (z_image, z_image_base)."""

    def query_supported_types(self) -> list[str]:
        return ["z_image", "z_image_base", *CONTROL_TYPES]

    def query_family_maps(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        """Base shares Turbo's architecture: LoRAs and settings of one apply to the other. The ControlNet types
        run Turbo's transformer (its LoRAs apply); v2.1 is v2's architecture with other blocks (Wan2GP's map)."""
        equivalences = {"z_image_base": "z_image", "z_image_control2_1": "z_image_control2"}
        compatibility = {"z_image": ["z_image_base", *CONTROL_TYPES], "z_image_base": ["z_image"]}
        return equivalences, compatibility | {t: ["z_image"] for t in CONTROL_TYPES}

    def query_family_infos(self) -> dict[str, tuple[int, str]]:
        return {FAMILY: (10, "Z-Image")}

    def query_model_family(self) -> str:
        """Wan2GP's call: the family id."""
        return FAMILY

    def get_rgb_factors(self, model_type: str) -> tuple[list[list[float]] | None, list[float] | None]:
        """Wan2GP's call for its live preview: the latent-to-RGB map, (16 rows of RGB, bias), from the facts."""
        latent = self.query_model_facts(model_type, {}).latent
        if latent is None or latent.rgb_factors is None:
            return None, None
        return [list(row) for row in latent.rgb_factors], list(latent.rgb_bias or (0.0, 0.0, 0.0))

    def fix_settings(self, model_type: str, settings_version: float, model_def: Mapping[str, Any], settings: dict[str, Any]) -> list[str]:
        """Wan2GP's hook, called by the host for a task read from a Wan2GP file: where Wan2GP runs Z-Image
        differently (guidance threshold, shift, default negative prompt), change `settings` in place so it runs
        here as it ran there; returns one note per change (models/z_image/wan2gp_z_image.py)."""
        from models.z_image.wan2gp_z_image import fix_wan2gp_settings

        defaults = ARCHITECTURE_DEFAULTS.get(model_type, ARCHITECTURE_DEFAULTS["z_image"])
        return fix_wan2gp_settings(settings, defaults["flow_shift"], BASE_NEGATIVE_PROMPT)

    def query_model_def(self, model_type: str, model_block: Mapping[str, Any]) -> dict[str, Any]:
        """The model-block keys Z-Image adds, with their defaults: `unified_solver` (Wan2GP's TwinFlow presets: the
        weights are sampled with sample_solver twinflow by default) and, for the ControlNet types, `modules`."""
        if not isinstance(model_block.get("unified_solver", False), bool):
            raise SettingsError(f"model.unified_solver must be true or false, got {model_block['unified_solver']!r}")
        if model_block.get("architecture") in CONTROL_TYPES:  # the ControlNet file(s): Wan2GP's "modules"
            from models.z_image.settings_z_image_control import check_modules

            return {"unified_solver": False, "modules": check_modules(model_block.get("modules"))}
        if "modules" in model_block:
            raise SettingsError(f"model.modules (ControlNet files) is for the {', '.join(CONTROL_TYPES)} architectures")
        return {"unified_solver": False}

    def query_model_facts(self, model_type: str, model_def: Mapping[str, Any]) -> ModelFacts:
        """Sizes, int8 layers, latent format and components (models/z_image/facts_z_image.py); one set
        for Turbo and Base, which share the network; the ControlNet types add their ControlNet."""
        if model_type in CONTROL_TYPES:
            return with_step_cache(controlnet_facts(CONTROL_VERSIONS[model_type]), model_type)
        return with_step_cache(FACTS, model_type)

    def query_settings_schema(self, model_type: str) -> list[SettingSpec]:
        """Every setting Z-Image accepts (models/z_image/settings_z_image.py SETTINGS) with `model_type`'s own
        defaults (Turbo: 8 steps, no guidance, shift 3; Base: 30 steps, guidance 4, shift 6, a negative prompt)."""
        if model_type in CONTROL_TYPES:  # Turbo's, with the control settings (settings_z_image_control.py)
            return control_schema(with_defaults(SETTINGS, ARCHITECTURE_DEFAULTS["z_image"]), model_type)
        if model_type not in ARCHITECTURE_DEFAULTS:
            raise ValueError(f"unknown Z-Image architecture {model_type!r} (known: {', '.join(ARCHITECTURE_DEFAULTS)})")
        return with_defaults(SETTINGS, ARCHITECTURE_DEFAULTS[model_type])

    def update_default_settings(self, model_type: str, model_def: Mapping[str, Any], settings: dict[str, Any]) -> None:
        """The schema's defaults for `model_type` (Wan2GP's call); a preset's values override them."""
        for spec in self.query_settings_schema(model_type):
            settings.setdefault(spec.name, spec.default)
        if model_def.get("unified_solver"):  # TwinFlow weights: their few-step sampler unless the preset says otherwise
            settings["sample_solver"] = "twinflow"

    def validate_settings(self, model_type: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The engine's own validation (raises SettingsError naming the field); values normalised."""
        control: dict[str, Any] = {}
        if model_type in CONTROL_TYPES:
            controls, settings = split_control_settings(settings)
            control = {f.name: getattr(controls, f.name) for f in fields(controls) if f.name != "image_guide"}
        s = GenerationSettings.from_dict(dict(settings))
        values = {f.name: getattr(s, f.name) for f in fields(s)}
        values["resolution"] = f"{s.width}x{s.height}"
        names = {spec.name for spec in self.query_settings_schema(model_type)}
        return {spec.name: values[spec.name] for spec in SETTINGS if spec.name in names} | control

    def register_lora_cli_args(self, parser: argparse.ArgumentParser, lora_root: str | Path | None = None) -> None:
        """Adds --lora-dir-z-image (Wan2GP's flag; `lora_root` as in its newer signature, for the help text)."""
        default = Path(lora_root or "loras") / FAMILY
        parser.add_argument("--lora-dir-z-image", type=Path, metavar="DIR", help=f"Z-Image LoRA folder (default: {default})")

    def get_lora_dir(self, model_type: str, args: argparse.Namespace | None, lora_root: str | Path | None = None) -> Path:
        """--lora-dir-z-image, else <root>/z_image; the root is `lora_root` (Wan2GP's newer signature), else --loras,
        else loras/."""
        chosen = getattr(args, "lora_dir_z_image", None) if args is not None else None
        root = lora_root or (getattr(args, "loras", None) if args is not None else None)  # --loras moves the root
        return Path(chosen) if chosen else Path(root or REPO_ROOT / "loras") / FAMILY

    def normalize_lora(self, state_dict: Mapping[str, Any], target_shapes: Mapping[str, tuple[int, int]] | None = None) -> Any:
        """LoRA keys of any dialect -> NormalizedLora (models/z_image/lora_z_image.py); errors name the key."""
        from models.z_image.lora_z_image import normalize_lora

        return normalize_lora(state_dict, target_shapes)

    def query_model_files(self, model_type: str, model_def: Mapping[str, Any], quantization: str) -> list[dict[str, Any]]:
        """VAE, text encoder, its config and tokenizer; nothing for a diffusers folder (it has them all).

        These files sit next to the preset's own files (so a self-test or mirrored layout stays whole);
        for a user's single file given by absolute path they come from the DeepBeepMeep repository.
        """
        urls = list(model_def.get("URLs") or [])
        if urls and _is_folder_entry(urls[0]):
            return _control_files(model_type, model_def)
        files = [
            {"role": role, "URLs": [_sibling(_layout_anchor(urls, DEFAULT_TRANSFORMER_URL), name)]} for role, name in VAE_FILES.items()
        ]
        text_encoder = list(model_def.get("text_encoder_URLs") or DEFAULT_TEXT_ENCODER_URLS)
        files.append({"role": "text_encoder", "URLs": text_encoder})
        anchor = _layout_anchor(text_encoder, DEFAULT_TEXT_ENCODER_URLS[0])
        files += [{"role": role, "URLs": [_sibling(anchor, name)]} for role, name in TEXT_ENCODER_FILES.items()]
        return files + _control_files(model_type, model_def)

    def preview_input(self, model_type: str, name: str, settings: Mapping[str, Any]) -> Any:
        """An image input as the model will read it (settings as `generate` gets them, images as PIL images): a
        ControlNet type's `image_guide` after `control_preprocess`, at the chosen size. The web form's preview."""
        if model_type not in CONTROL_TYPES or name != "image_guide":
            raise SettingsError(f"{name} has no preview for {model_type}")
        if settings.get("image_guide") is None:
            raise SettingsError("no control image to preview: upload one as image_guide first")
        from common.settings_schema import parse_size
        from models.z_image.control_images import make_control_image

        width, height = parse_size(settings["resolution"])
        return make_control_image(settings["image_guide"], settings.get("control_preprocess", "raw"), width, height)

    def load_model(self, model_type: str, model_def: Mapping[str, Any], files: Mapping[str, Path], options: Mapping[str, Any]) -> Any:
        """Build the engine's pipeline from resolved files; `options` has device and dtype (host's choice)."""
        from models.z_image import loading_z_image
        from models.z_image.pipeline_z_image import LoadOptions, ZImagePipeline

        if options.get("quantized_loader") is not None:  # the host's int8 quanto reader (host/lowvram/quantize.py)
            loading_z_image.register_quantized_loader(options["quantized_loader"])
        load = LoadOptions(
            device=options["device"], dtype=options["dtype"], keep_text_encoder=options.get("keep_text_encoder", True)
        )
        if model_type in CONTROL_TYPES:
            from models.z_image.pipeline_z_image_controlnet import ZImageControlNetPipeline

            return ZImageControlNetPipeline.from_components(components_from_files(files), load, Path(files["controlnet"]))
        return ZImagePipeline.from_components(components_from_files(files), load)

    def write_selftest_files(self, model_type: str, model_def: Mapping[str, Any], ckpts: Path) -> None:
        """Write the tiny random model into the self-test preset's sub-folder of `ckpts`, adding only
        missing files; a preset pointing anywhere else is refused (models/z_image/tiny_z_image.py)."""
        from models.z_image.tiny_z_image import write_selftest_layout

        write_selftest_layout(model_def.get("URLs"), model_def.get("text_encoder_URLs"), ckpts)


def components_from_files(files: Mapping[str, Path]) -> Any:
    """role -> path (as the host resolved them) -> the engine's ZImageComponents."""
    from models.z_image.pipeline_z_image import ZImageComponents

    transformer = Path(files["transformer"])
    if transformer.is_dir():
        if not (transformer / "model_index.json").is_file():
            raise CheckpointError(
                f"{transformer} is a folder without model_index.json: point URLs at the diffusers folder that holds "
                "transformer/, text_encoder/, tokenizer/ and vae/"
            )
        return ZImageComponents.from_diffusers_folder(transformer)
    return ZImageComponents(
        transformer=transformer,
        text_encoder=Path(files["text_encoder"]),
        tokenizer=Path(files["tokenizer"]).parent,
        vae=Path(files["vae"]),
        text_encoder_config=Path(files["text_encoder_config"]),
        vae_config=Path(files["vae_config"]),
    )


def _control_files(model_type: str, model_def: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A ControlNet type's ControlNet: the first of the preset's `modules` (its bf16 / int8 variants)."""
    if model_type not in CONTROL_TYPES:
        return []
    return [{"role": "controlnet", "URLs": list(model_def["modules"][0])}]


def _is_folder_entry(entry: str) -> bool:
    """A local entry without a weights suffix is a diffusers folder."""
    return not entry.startswith(("http://", "https://")) and PurePosixPath(entry).suffix.lower() not in WEIGHT_SUFFIXES


def _layout_anchor(entries: list[str], default: str) -> str:
    """The entry whose folder holds the companion files: the preset's own, unless it is a user's absolute path."""
    if not entries or Path(entries[0]).expanduser().is_absolute():
        return default
    return entries[0]


def _sibling(entry: str, name: str) -> str:
    """'https://.../resolve/main/Qwen3/qwen3_bf16.safetensors' + 'config.json' -> '.../Qwen3/config.json'."""
    return f"{entry.rsplit('/', 1)[0]}/{name}" if "/" in entry else name


family_handler = ZImageHandler()
