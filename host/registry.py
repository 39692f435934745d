"""Family discovery: find every `models/<family>/*_handler.py` exposing `family_handler`.

The registry maps each architecture (a preset's `model.architecture`) to the handler that claims it.
The `FamilyHandler` protocol below is the whole interface between the host and a family.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from common.errors import UserInputError
from common.model_facts import ModelFacts
from common.model_hooks import ModelHooks
from common.settings_schema import SettingSpec

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS_ROOT = REPO_ROOT / "models"


class RegistryError(UserInputError):
    """A family folder is broken, or two families claim the same architecture."""


class GenerationOutput(Protocol):
    """What a loaded model's `generate` returns (the engine's GenerationResult fits)."""

    images: list[Any]  # PIL images
    seed: int
    prompt_tokens: int
    truncated: bool
    timings: dict[str, float]


class LoadedModel(Protocol):
    """A model built by `FamilyHandler.load_model`: what transforms (host/transforms.py) may use.

    - `components()`: its parts by name ("text_encoder", "transformer", "vae", ...), None where not loaded now;
    - `hooks`: a `common.model_hooks.ModelHooks` the model routes its prompt encoding, decoding and steps
      through (transforms add entries there; nothing replaces the model's methods);
    - `device`: where it computes.
    A model without `hooks` still runs; the transforms that need them are skipped.
    """

    hooks: ModelHooks
    device: Any

    def components(self) -> dict[str, Any]: ...

    def generate(self, settings: Mapping[str, Any], on_step: Callable[[Any], None] | None = None) -> GenerationOutput: ...

    def release(self) -> None: ...


@runtime_checkable
class FamilyHandler(Protocol):
    """The typed interface of `family_handler` (Wan2GP's method names).

    `query_model_files` returns plain dicts (the handler must not import the host):
    `{"role": str, "URLs": list[str]}`, one dict per file; `URLs` lists the variants of that file
    (https URLs, absolute paths or paths relative to the checkpoint folders), the dtype token in the
    name decides which variant a quantization setting picks.
    """

    def query_supported_types(self) -> list[str]: ...

    def query_family_maps(self) -> tuple[dict[str, str], dict[str, list[str]]]: ...

    def query_family_infos(self) -> dict[str, tuple[int, str]]: ...

    def query_model_def(self, model_type: str, model_block: Mapping[str, Any]) -> dict[str, Any]: ...

    def query_model_facts(self, model_type: str, model_def: Mapping[str, Any]) -> ModelFacts:
        """Components, sizes, int8 layers and latent format (common/model_facts.py): what the planner,
        the preview, int8 and offload know about the model; the host keeps no model's numbers."""
        ...

    def query_settings_schema(self, model_type: str) -> list[SettingSpec]:
        """Every setting the family accepts for `model_type` (common/settings_schema.py), with its defaults:
        the host builds validation, CLI flags, the web form, the docs table and saved settings from it."""
        ...

    def update_default_settings(self, model_type: str, model_def: Mapping[str, Any], settings: dict[str, Any]) -> None:
        """Adjust the schema's defaults in `settings` for a model definition, in place (Wan2GP's call)."""
        ...

    def validate_settings(self, model_type: str, settings: Mapping[str, Any]) -> dict[str, Any]: ...

    def register_lora_cli_args(self, parser: argparse.ArgumentParser) -> None: ...

    def get_lora_dir(self, model_type: str, args: argparse.Namespace | None) -> Path: ...

    def query_model_files(self, model_type: str, model_def: Mapping[str, Any], quantization: str) -> list[dict[str, Any]]: ...

    def load_model(
        self, model_type: str, model_def: Mapping[str, Any], files: Mapping[str, Path], options: Mapping[str, Any]
    ) -> LoadedModel: ...


@dataclass
class Family:
    """One discovered family folder."""

    name: str  # folder name, e.g. "z_image"
    handler: FamilyHandler
    source: Path
    types: list[str]
    label: str
    order: int


@dataclass
class Registry:
    """Architectures -> handlers, plus each family's label, order and equivalence maps."""

    families: dict[str, Family] = field(default_factory=dict)
    handlers: dict[str, FamilyHandler] = field(default_factory=dict)  # architecture -> handler
    family_of: dict[str, str] = field(default_factory=dict)  # architecture -> family folder name
    equivalences: dict[str, str] = field(default_factory=dict)  # e.g. z_image_base -> z_image
    compatibility: dict[str, list[str]] = field(default_factory=dict)

    @property
    def architectures(self) -> list[str]:
        return sorted(self.handlers)

    def handler_for(self, architecture: str) -> FamilyHandler:
        """The handler that claims `architecture`; an error listing the known ones otherwise."""
        try:
            return self.handlers[architecture]
        except KeyError:
            known = ", ".join(self.architectures) or "none"
            raise RegistryError(f"unknown architecture '{architecture}' (known: {known})") from None

    def base_type(self, architecture: str) -> str:
        """The architecture this one is equivalent to (itself when none)."""
        return self.equivalences.get(architecture, architecture)


def query_facts(handler: FamilyHandler, model_type: str, model_def: Mapping[str, Any], where: str) -> ModelFacts:
    """The family's `ModelFacts` for `model_type`; anything else is a broken family, named by `where`."""
    facts = handler.query_model_facts(model_type, model_def)
    if not isinstance(facts, ModelFacts):
        raise RegistryError(
            f"{where}: the {type(handler).__name__} family answered query_model_facts({model_type!r}) with "
            f"{type(facts).__name__}; it must return common.model_facts.ModelFacts"
        )
    return facts


def discover(models_root: Path = DEFAULT_MODELS_ROOT) -> Registry:
    """Import every `<models_root>/<family>/*_handler.py` that exposes `family_handler`."""
    registry = Registry()
    if not models_root.is_dir():
        raise RegistryError(f"models folder {models_root} does not exist")
    for handler_file in sorted(models_root.glob("*/*_handler.py")):
        handler = _import_handler(models_root, handler_file)
        if handler is not None:
            _add_family(registry, handler_file.parent.name, handler, handler_file)
    return registry


def _import_handler(models_root: Path, handler_file: Path) -> FamilyHandler | None:
    """Import one handler file; files without `family_handler` are skipped with a log line."""
    module = _import_module(models_root, handler_file)
    handler = getattr(module, "family_handler", None)
    if handler is None:
        log.info("%s has no family_handler: skipped", handler_file)
        return None
    missing = [name for name in _PROTOCOL_METHODS if not callable(getattr(handler, name, None))]
    if missing:
        raise RegistryError(f"{handler_file}: family_handler lacks {', '.join(missing)} (see host/registry.py FamilyHandler)")
    return handler


_PROTOCOL_METHODS = [
    name for name in FamilyHandler.__dict__ if name.startswith(("query_", "update_", "validate_", "register_", "get_", "load_"))
]


def _import_module(models_root: Path, handler_file: Path) -> types.ModuleType:
    """The repository's own families import as `models.<family>.<name>`; other roots by file path."""
    family = handler_file.parent.name
    try:
        if models_root.resolve() == DEFAULT_MODELS_ROOT:
            return importlib.import_module(f"models.{family}.{handler_file.stem}")
        return _import_by_path(models_root, handler_file)
    except UserInputError:
        raise
    except Exception as exc:  # a broken family must name itself, not crash with a bare traceback
        raise RegistryError(f"could not import {handler_file}: {type(exc).__name__}: {exc}") from exc


def _import_by_path(models_root: Path, handler_file: Path) -> types.ModuleType:
    """Import a handler outside the repository under a synthetic package (relative imports work)."""
    root_id = hashlib.sha1(str(models_root.resolve()).encode()).hexdigest()[:8]
    package = f"_wgp_families_{root_id}.{handler_file.parent.name}"
    for name, path in ((package.split(".")[0], models_root), (package, handler_file.parent)):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    module_name = f"{package}.{handler_file.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, handler_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _add_family(registry: Registry, name: str, handler: FamilyHandler, source: Path) -> None:
    """Register a family's architectures; two families claiming one architecture is an error."""
    supported = list(handler.query_supported_types())
    for arch in supported:
        if arch in registry.handlers:
            other = registry.families[registry.family_of[arch]].source
            raise RegistryError(
                f"architecture '{arch}' is claimed by two families: {other} and {source}. Rename it in one of them or remove one folder."
            )
    equivalences, compatibility = handler.query_family_maps()
    infos = handler.query_family_infos()
    order, label = infos.get(name, next(iter(infos.values()), (100, name)))
    registry.families[name] = Family(name, handler, source, supported, label, order)
    for arch in supported:
        registry.handlers[arch] = handler
        registry.family_of[arch] = name
    registry.equivalences.update(equivalences)
    registry.compatibility.update(compatibility)
