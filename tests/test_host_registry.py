"""Discovery: families are found by folder, the real z_image family included; clashes are errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from host.registry import DEFAULT_MODELS_ROOT, FamilyHandler, RegistryError, discover
from tests.fixtures.host_env import TOY_FAMILY


def test_repository_families_include_z_image() -> None:
    registry = discover(DEFAULT_MODELS_ROOT)
    assert {"z_image", "z_image_base"} <= set(registry.architectures)
    assert registry.base_type("z_image_base") == "z_image"
    assert registry.families["z_image"].label == "Z-Image"
    assert isinstance(registry.handler_for("z_image"), FamilyHandler)


def test_a_dropped_folder_adds_a_family(tmp_path: Path) -> None:
    shutil.copytree(TOY_FAMILY, tmp_path / "toy")
    registry = discover(tmp_path)
    assert registry.architectures == ["toy", "toy_plus"]
    family = registry.families["toy"]
    assert (family.order, family.label) == (50, "Toy family")
    assert registry.equivalences == {"toy_plus": "toy"}


def test_two_families_claiming_one_type_is_a_startup_error(tmp_path: Path) -> None:
    shutil.copytree(TOY_FAMILY, tmp_path / "toy")
    clone = tmp_path / "toy_clone"
    clone.mkdir()
    (clone / "toy_clone_handler.py").write_text((TOY_FAMILY / "toy_handler.py").read_text())
    with pytest.raises(RegistryError, match="'toy' is claimed by two families"):
        discover(tmp_path)


def test_handler_without_family_handler_is_skipped(tmp_path: Path) -> None:
    shutil.copytree(TOY_FAMILY, tmp_path / "toy")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "other_handler.py").write_text("X = 1\n")
    assert discover(tmp_path).architectures == ["toy", "toy_plus"]


def test_broken_handler_names_its_file(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bad_handler.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(RegistryError, match="bad_handler.py"):
        discover(tmp_path)


def test_incomplete_handler_lists_missing_methods(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "half_handler.py").write_text(
        "class H:\n    def query_supported_types(self):\n        return ['half']\nfamily_handler = H()\n"
    )
    with pytest.raises(RegistryError, match="lacks .*load_model"):
        discover(tmp_path)


def test_unknown_architecture_lists_known(tmp_path: Path) -> None:
    shutil.copytree(TOY_FAMILY, tmp_path / "toy")
    with pytest.raises(RegistryError, match="unknown architecture 'flux'.*toy"):
        discover(tmp_path).handler_for("flux")
