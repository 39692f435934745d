"""Shared fixtures: one tiny random Z-Image model (seed 0), written once per session in every layout.

Add new session fixtures here when several test files need them; file-specific ones stay in their file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_diffusers_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """diffusers' own `save_pretrained` layout: transformer/ text_encoder/ tokenizer/ vae/ scheduler/."""
    from models.z_image.tiny_z_image import write_diffusers_layout

    return write_diffusers_layout(tmp_path_factory.mktemp("tiny_diffusers"), seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_flat_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DeepBeepMeep file names; role -> path (transformer, vae, vae_config, text_encoder, tokenizer, ...)."""
    from models.z_image.tiny_z_image import write_flat_layout

    return write_flat_layout(tmp_path_factory.mktemp("tiny_flat"), seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_comfy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ComfyUI single-file transformer (prefix, fused qkv)."""
    from models.z_image.tiny_z_image import write_comfy_transformer

    return write_comfy_transformer(tmp_path_factory.mktemp("tiny_comfy") / "z_image_comfy.safetensors", seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_comfy_fused_ffn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ComfyUI single-file transformer with the FFN fused too (`feed_forward.net.0.proj` / `net.2`)."""
    from models.z_image.tiny_z_image import write_comfy_transformer

    folder = tmp_path_factory.mktemp("tiny_comfy_ffn")
    return write_comfy_transformer(folder / "z_image_comfy_ffn.safetensors", seed=TINY_SEED, fuse_ffn=True)


# -- tests that could crash the process run in their own ----------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """`@pytest.mark.isolated` tests run in a child process (tests/fixtures/isolation.py)."""
    from tests.fixtures.isolation import in_child, run_isolated

    if pyfuncitem.get_closest_marker("isolated") is None or in_child():
        return None
    run_isolated(pyfuncitem)
    return True
