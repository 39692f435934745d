"""Validation of generation settings at the boundary."""

from __future__ import annotations

import pytest

from common.errors import SettingsError
from models.z_image.settings_z_image import GenerationSettings


def test_resolution_and_types() -> None:
    s = GenerationSettings.from_dict({"prompt": "x", "resolution": "1280x768", "num_inference_steps": "8", "cfg_normalization": True})
    assert (s.width, s.height, s.num_inference_steps, s.cfg_normalization) == (1280, 768, 8, 1.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prompt": "x", "width": 1000}, r"multiple of 16 \(got 1000\); nearest valid sizes: 992 or 1008"),
        ({"prompt": "x", "resolution": "1024x770"}, "nearest valid sizes: 768 or 784"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps must be between 1"),
        ({"prompt": "x", "guidance": 3}, "unknown setting 'guidance' \\(did you mean 'guidance_scale'\\?\\)"),
        ({"prompt": "x", "resolution": "big"}, "resolution must look like"),
        ({"prompt": "x", "seed": 1.5}, "whole number"),
        ({"prompt": "x", "batch_size": True}, "must be an integer"),
        ({"prompt": 3}, "must be text"),
        ({"negative_prompt": "y"}, "'prompt' is required"),
        ({"prompt": "x", "max_sequence_length": 2048}, "max_sequence_length must be between 1 and 1024"),
        ({"prompt": "x", "resolution": "512x512", "width": 640}, "give one of them"),
    ],
)
def test_bad_settings_have_clear_messages(settings: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        GenerationSettings.from_dict(settings)
