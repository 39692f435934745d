"""Seed variety (models/z_image/variety_z_image.py): off = bit-identical images; on = seeded noise of the
declared size on the prompt embedding, in the first steps only, different per seed and per image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from models.z_image.variety_z_image import perturbed_embeddings, prompt_schedule
from tests.fixtures.pipelines import flat_pipeline

BASE = dict(prompt="a photo of a cat sitting on a red chair", width=64, height=64, num_inference_steps=4, seed=3)


def test_perturbation_has_the_declared_size() -> None:
    gen = torch.Generator().manual_seed(0)
    spread = torch.ones(64)
    spread[:2] = 300.0  # two outlier features, as the text encoder's hidden states have
    embeds = torch.randn(200, 64, generator=gen) * spread + 1
    [noisy] = perturbed_embeddings(embeds, 1, 0.5, seed=9)
    delta = noisy - embeds
    # each feature's noise is 0.5 x that feature's own spread: about 150 on the outliers, about 0.5 elsewhere
    assert abs(float(delta[:, 2:].std()) - 0.5) < 0.02 and abs(float(delta[:, :2].std()) / 150 - 1) < 0.1
    assert abs(float(delta.mean())) < 0.5
    again = perturbed_embeddings(embeds, 2, 0.5, seed=9)
    assert torch.equal(again[0], noisy) and not torch.equal(again[1], noisy)  # seeded; one draw per image
    assert not torch.equal(perturbed_embeddings(embeds, 1, 0.5, seed=10)[0], noisy)  # another seed, another draw


def test_schedule_uses_the_noisy_captions_in_the_first_steps_only() -> None:
    embeds = torch.ones(5, 8)
    schedule = prompt_schedule(embeds, 2, 1.0, steps=2, seed=1)
    assert schedule.at(0) is schedule.at(1) is schedule.noisy and schedule.at(2) is schedule.at(3) is schedule.clean
    assert all(c is embeds for c in schedule.clean)
    off = prompt_schedule(embeds, 2, 0.0, steps=2, seed=1)
    assert off.noisy is None and all(c is embeds for c in off.at(0))


@pytest.fixture(scope="module")
def pipe(tiny_flat_layout: dict[str, Path]) -> Any:
    return flat_pipeline(tiny_flat_layout)


def _run(pipe: Any, **settings: Any) -> tuple[bytes, list[torch.Tensor]]:
    captions: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: captions.append(args[2][0].clone()))
    try:
        image = pipe.generate({**BASE, **settings}).images[0]
    finally:
        hook.remove()
    return image.tobytes(), captions


def test_off_is_bit_identical_and_on_changes_only_the_first_steps(pipe: Any) -> None:
    plain, clean = _run(pipe)
    off, off_captions = _run(pipe, seed_variety=0.0, seed_variety_steps=3)
    assert off == plain and all(torch.equal(a, b) for a, b in zip(off_captions, clean, strict=True))
    varied, captions = _run(pipe, seed_variety=1.0, seed_variety_steps=2)
    assert varied != plain
    assert not torch.equal(captions[0], clean[0]) and torch.equal(captions[0], captions[1])  # one draw, 2 steps
    assert torch.equal(captions[2], clean[2]) and torch.equal(captions[3], clean[3])  # then the clean prompt
    assert _run(pipe, seed_variety=1.0, seed_variety_steps=2)[0] == varied  # seeded: the same image again
