"""Prompt cache keys (host/lowvram/prompt_cache.py) through the real tiny pipeline: a cached embedding must be the one
the text encoder would give for that prompt, that max_sequence_length and that encoder file.

Each test compares what comes through the cache with the uncached encoder (`_encode_prompt`, the model's own encoder under the hooks),
so a key that conflates two prompts or two encoder files returns a wrong embedding and fails here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from host.lowvram import apply_lowvram, load_options
from host.lowvram.prompt_cache import PromptCache, attach_prompt_cache, file_identity, shared_cache
from models.z_image.facts_z_image import FACTS
from tests.fixtures.pipelines import flat_pipeline

F32 = torch.float32
LONG_PROMPT = "a photo of a cat sitting on a red chair, studio lighting, high detail, film grain, soft light"


def _pipeline(flat: dict[str, Path], text_encoder: Path | None = None):
    return flat_pipeline(flat, text_encoder=text_encoder)


def _other_weights(source: Path, target: Path, seed: int = 1) -> Path:
    """The same text encoder file with every weight nudged: same keys, shapes and byte size, other embeddings."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=gen) * v.abs().mean() for k, v in load_file(source).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, target)
    assert target.stat().st_size == source.stat().st_size
    return target


def _same(a, b) -> bool:
    return a.embeds.shape == b.embeds.shape and torch.equal(a.embeds, b.embeds)


def test_equal_length_prompts_get_their_own_embeddings(tiny_flat_layout: dict[str, Path]) -> None:
    pipe = _pipeline(tiny_flat_layout)
    uncached = pipe._encode_prompt  # the model's own encoder, under the hooks
    cache = attach_prompt_cache(pipe, file_identity(tiny_flat_layout["text_encoder"]), PromptCache())
    prompts = ("a red fox", "a big cat", "a red fix")  # 9 characters each; the last differs by one letter
    first = {p: pipe.encode_prompt(p, 512) for p in prompts}
    again = {p: pipe.encode_prompt(p, 512) for p in prompts}
    assert cache.misses == 3 and cache.hits == 3
    for p in prompts:
        assert _same(first[p], uncached(p, 512)) and _same(again[p], first[p]), p
    assert not _same(first["a red fox"], first["a big cat"]) and not _same(first["a red fox"], first["a red fix"])


def test_changed_max_sequence_length_is_a_miss(tiny_flat_layout: dict[str, Path]) -> None:
    pipe = _pipeline(tiny_flat_layout)
    uncached = pipe._encode_prompt  # the model's own encoder, under the hooks
    cache = attach_prompt_cache(pipe, file_identity(tiny_flat_layout["text_encoder"]), PromptCache())
    full = pipe.encode_prompt(LONG_PROMPT, 512)
    cut = pipe.encode_prompt(LONG_PROMPT, 16)  # the prompt is longer than 16 tokens: truncated
    assert cache.misses == 2 and cache.hits == 0
    assert full.embeds.shape[0] > 16 and cut.embeds.shape[0] == 16 and cut.truncated and not full.truncated
    assert _same(cut, uncached(LONG_PROMPT, 16)) and _same(pipe.encode_prompt(LONG_PROMPT, 512), full)


def test_another_encoder_file_is_a_miss(tiny_flat_layout: dict[str, Path], tmp_path: Path) -> None:
    """One cache shared by two pipelines (as the process-wide cache outlives model reloads): the same prompt
    with another text encoder file (other path, same size) must give that encoder's embedding."""
    other = _other_weights(tiny_flat_layout["text_encoder"], tmp_path / "other" / "qwen3_bf16.safetensors")
    cache = PromptCache()
    pipes = {}
    for name, path in (("original", tiny_flat_layout["text_encoder"]), ("other", other)):
        pipes[name] = _pipeline(tiny_flat_layout, path)
        attach_prompt_cache(pipes[name], file_identity(path), cache)
    got = {name: pipe.encode_prompt("a red fox", 512) for name, pipe in pipes.items()}
    assert cache.misses == 2 and len(cache) == 2
    for name, pipe in pipes.items():
        assert _same(got[name], pipe._encode_prompt("a red fox", 512)), name
    assert not _same(got["original"], got["other"])


def test_encoder_file_rewritten_in_place_is_a_miss(tiny_flat_layout: dict[str, Path], tmp_path: Path) -> None:
    """Same path, same size, new content (a re-download or a fine-tuned file saved over the old one): the model
    reloaded through the host's low-VRAM path (process-wide cache, file identity) encodes anew."""
    flat = {**tiny_flat_layout, "text_encoder": tmp_path / "Qwen3" / "qwen3_bf16.safetensors"}
    flat["text_encoder"].parent.mkdir()
    shutil.copy(tiny_flat_layout["text_encoder"], flat["text_encoder"])
    options = load_options({"device": "cpu", "dtype": F32, "quantization": "bf16", "profile": "auto"})
    shared_cache().clear()
    try:
        before = apply_lowvram(_pipeline(flat), options, {"text_encoder": flat["text_encoder"]}, FACTS).model
        old = before.encode_prompt("a red fox", 512)
        identity = file_identity(flat["text_encoder"])
        _other_weights(tiny_flat_layout["text_encoder"], flat["text_encoder"])
        if file_identity(flat["text_encoder"]) == identity:  # a coarse file-system clock: make the rewrite visible
            stat = flat["text_encoder"].stat()
            os.utime(flat["text_encoder"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        after = apply_lowvram(_pipeline(flat), options, {"text_encoder": flat["text_encoder"]}, FACTS).model
        new = after.encode_prompt("a red fox", 512)
        assert _same(new, after._encode_prompt("a red fox", 512)) and not _same(new, old)
        assert shared_cache().misses >= 2 and len(shared_cache()) == 2
    finally:
        shared_cache().clear()


def test_file_identity_is_path_size_and_mtime(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"0123")
    shutil.copy2(a, b)  # same bytes and mtime, other path
    assert file_identity(a) != file_identity(b)
    first = file_identity(a)
    a.write_bytes(b"01234")  # other size
    assert file_identity(a)[1] == 5 and file_identity(a) != first
    stat = a.stat()
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same size, rewritten later
    assert file_identity(a) != (str(a.resolve()), stat.st_size, stat.st_mtime_ns)
    missing = tmp_path / "missing.safetensors"
    assert file_identity(missing) == (str(missing.resolve()), -1, -1)


def test_cache_entries_live_on_the_cpu(tiny_flat_layout: dict[str, Path]) -> None:
    pipe = _pipeline(tiny_flat_layout)
    cache = attach_prompt_cache(pipe, file_identity(tiny_flat_layout["text_encoder"]), PromptCache())
    out = pipe.encode_prompt(LONG_PROMPT, 512)
    ((value, nbytes),) = cache._entries.values()
    assert value.embeds.device.type == "cpu" and nbytes == out.embeds.numel() * 4 and cache.bytes == nbytes
