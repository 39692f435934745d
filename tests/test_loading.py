"""Loading every checkpoint layout: one tiny random model written as flat files, a diffusers folder,
ComfyUI single files and shards must load to the same weights; bad files fail with clear errors."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import CheckpointError
from models.z_image import loading_z_image as loading
from models.z_image.convert_z_image import convert_state_dict, detect_layout, strip_prefixes
from models.z_image.loading_z_image import (
    CONFIG_DIR,
    infer_config,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
    load_vae,
)
from models.z_image.tiny_z_image import TINY_CONFIG, comfy_state_dict
from models.z_image.transformer_z_image import ZImageConfig, ZImageTransformer

F32 = torch.float32


def _forward(model: ZImageTransformer) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 8, 12, generator=gen)
    caps = [torch.randn(7, TINY_CONFIG.cap_feat_dim, generator=gen)]
    with torch.no_grad():
        return model(x, torch.tensor([0.3]), caps)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the layouts agree ------------------------------------------------------------------------------


def test_three_layouts_load_to_the_same_transformer(
    tiny_flat_layout: dict[str, Path],
    tiny_diffusers_folder: Path,
    tiny_comfy_file: Path,
    tiny_comfy_fused_ffn_file: Path,
) -> None:
    flat = load_transformer(tiny_flat_layout["transformer"], None, F32)
    assert flat.config == TINY_CONFIG  # inferred from the shapes: a flat file ships no config
    expected = _forward(flat)
    assert expected.abs().mean() > 1e-3  # randomised pad tokens and final layer: not trivially zero
    for path in (tiny_diffusers_folder / "transformer", tiny_comfy_file, tiny_comfy_fused_ffn_file):
        model = load_transformer(path, None, F32)
        assert model.config == TINY_CONFIG
        assert _same_weights(model, flat), path
        assert torch.equal(_forward(model), expected), path


def test_flat_weights_equal_diffusers_reference(tiny_flat_layout: dict[str, Path], tiny_diffusers_folder: Path) -> None:
    reference = load_file(tiny_diffusers_folder / "transformer" / "diffusion_pytorch_model.safetensors")
    ours = load_transformer(tiny_flat_layout["transformer"], None, F32).state_dict()
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_text_encoder_tokenizer_vae_flat_and_diffusers_agree(
    tiny_flat_layout: dict[str, Path], tiny_diffusers_folder: Path
) -> None:
    flat_te = load_text_encoder(tiny_flat_layout["text_encoder"], tiny_flat_layout["text_encoder_config"], F32)
    diff_te = load_text_encoder(tiny_diffusers_folder / "text_encoder", None, F32)
    assert _same_weights(flat_te, diff_te)
    flat_tok = load_tokenizer(tiny_flat_layout["tokenizer"])
    diff_tok = load_tokenizer(tiny_diffusers_folder / "tokenizer")
    text = flat_tok.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    ids = flat_tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, diff_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        h_flat = flat_te(ids, output_hidden_states=True).hidden_states[-2]
        h_diff = diff_te(ids, output_hidden_states=True).hidden_states[-2]
    assert h_flat.shape == (1, ids.shape[1], TINY_CONFIG.cap_feat_dim) and torch.equal(h_flat, h_diff)

    flat_vae = load_vae(tiny_flat_layout["vae"], None, F32)  # config found as <stem>_config.json
    assert _same_weights(flat_vae, load_vae(tiny_diffusers_folder / "vae", None, F32))
    assert flat_vae.config.scaling_factor == pytest.approx(0.3611) and flat_vae.config.shift_factor == pytest.approx(
        0.1159
    )


def test_text_encoder_without_model_prefix_or_lm_head(tiny_flat_layout: dict[str, Path], tmp_path: Path) -> None:
    state = load_file(tiny_flat_layout["text_encoder"])
    bare = {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("lm_head.")}
    save_file(bare, tmp_path / "qwen3.safetensors")
    shutil.copy(tiny_flat_layout["text_encoder_config"], tmp_path / "config.json")  # found beside the file
    prefixed = load_text_encoder(tiny_flat_layout["text_encoder"], None, F32)
    assert _same_weights(load_text_encoder(tmp_path / "qwen3.safetensors", None, F32), prefixed)


def test_sharded_diffusers_transformer(tiny_diffusers_folder: Path, tmp_path: Path) -> None:
    state = load_file(tiny_diffusers_folder / "transformer" / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, tmp_path / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(tiny_diffusers_folder / "transformer" / "config.json", tmp_path / "config.json")
    model = load_transformer(tmp_path, None, F32)
    assert _same_weights(model, load_transformer(tiny_diffusers_folder / "transformer", None, F32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, F32])
def test_dtype_applied_and_nothing_left_on_meta(
    tiny_comfy_file: Path, caplog: pytest.LogCaptureFixture, dtype: torch.dtype
) -> None:
    with caplog.at_level(logging.INFO, logger="models.z_image.loading_z_image"):
        model = load_transformer(tiny_comfy_file, None, dtype)
    assert "missing keys: [], unexpected keys: []" in caplog.text  # reported every time
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(not t.is_meta for t in tensors)
    assert all(p.dtype == dtype for p in model.parameters())
    # Each parameter owns its storage: no views into a second full copy (e.g. a fused qkv tensor).
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)


# -- configs ----------------------------------------------------------------------------------------


def test_config_inference_from_shapes_and_shipped_configs() -> None:
    released = ZImageConfig()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ZImageTransformer(released).state_dict().items()}
    assert infer_config(shapes) == released  # the real 6B shapes give the real config
    for name in ("z_image_turbo.json", "z_image_base.json"):
        assert ZImageConfig.from_json(CONFIG_DIR / name) == released
    with pytest.raises(CheckpointError, match="x_pad_token"):
        infer_config({k: v for k, v in shapes.items() if k != "x_pad_token"})


def test_explicit_config_json_is_used(tiny_flat_layout: dict[str, Path], tmp_path: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**TINY_CONFIG.to_dict(), "rope_theta": 100.0}))
    assert load_transformer(tiny_flat_layout["transformer"], config_path, F32).config.rope_theta == 100.0


# -- errors -----------------------------------------------------------------------------------------


def test_missing_key_names_file_and_key(tiny_flat_layout: dict[str, Path], tmp_path: Path) -> None:
    state = load_file(tiny_flat_layout["transformer"])
    del state["layers.1.feed_forward.w2.weight"]
    path = tmp_path / "ZImageTurbo_bf16.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match="layers.1.feed_forward.w2.weight") as err:
        load_transformer(path, None, F32)
    assert str(path) in str(err.value)


def test_shape_mismatch_names_the_keys(tiny_flat_layout: dict[str, Path]) -> None:
    wrong = ZImageConfig(**{**TINY_CONFIG.to_dict(), "cap_feat_dim": 32})
    with pytest.raises(CheckpointError, match=r"shape mismatch.*cap_embedder") as err:
        load_transformer(tiny_flat_layout["transformer"], wrong, F32)
    assert str(tiny_flat_layout["transformer"]) in str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.001])  # cut in the data, cut in the header
def test_truncated_file_says_incomplete(tiny_flat_layout: dict[str, Path], tmp_path: Path, keep: float) -> None:
    path = tmp_path / "ZImageTurbo_bf16.safetensors"
    data = tiny_flat_layout["transformer"].read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="incomplete") as err:
        load_transformer(path, None, F32)
    assert str(path) in str(err.value) and "download it again" in str(err.value)


def test_missing_file_and_missing_configs(tmp_path: Path, tiny_flat_layout: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_transformer(tmp_path / "nope.safetensors", None, F32)
    with pytest.raises(CheckpointError, match="VAE config"):
        load_vae(tiny_flat_layout["vae"], tmp_path / "nope.json", F32)
    with pytest.raises(CheckpointError, match="text encoder config"):
        load_text_encoder(tiny_flat_layout["text_encoder"], tmp_path / "nope.json", F32)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)


FOREIGN = [
    ("Flux", ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]),
    ("Wan", ["blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k.weight", "patch_embedding.weight"]),
    ("Qwen-Image", ["transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.attn.to_q.weight"]),
    (
        "Stable Diffusion (UNet)",
        ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"],
    ),
    # Lumina2 without refiners, and with them (its blocks modulate through adaLN_modulation.1, after a SiLU).
    ("Lumina2", ["model.diffusion_model.layers.0.attention.qkv.weight", "model.diffusion_model.x_embedder.weight"]),
    (
        "Lumina2",
        [
            "layers.0.attention.qkv.weight",
            "layers.0.adaLN_modulation.1.weight",
            "noise_refiner.0.attention.qkv.weight",
            "context_refiner.0.attention.qkv.weight",
        ],
    ),
    ("text encoder", ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]),
]


@pytest.mark.parametrize(("family", "keys"), FOREIGN)
def test_other_model_is_named(family: str, keys: list[str], tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, path)
    with pytest.raises(CheckpointError, match=rf"is a {re.escape(family)}.*checkpoint, not Z-Image") as err:
        load_transformer(path, None, F32)
    assert str(path) in str(err.value)


def _write_quanto(flat_transformer: Path, path: Path) -> None:
    """Our names with the repeated blocks' matrices as quanto int8 (`<m>.weight._data` + per-row `_scale`)."""
    state, qmap = load_file(flat_transformer), {}
    for key in [k for k, v in state.items() if k.startswith("layers.") and v.ndim == 2]:
        weight = state.pop(key)
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        state[f"{key}._data"] = (weight / scale).round().to(torch.int8)
        state[f"{key}._scale"] = scale
        qmap[key.removesuffix(".weight")] = {"weights": "qint8", "activations": "none"}
    qmap_b64 = base64.b64encode(json.dumps(qmap).encode()).decode()
    save_file(state, path, metadata={"quantization_format": "quanto", "quantization_map_base64": qmap_b64})


def test_quanto_int8_recognised_with_clear_message(
    tiny_flat_layout: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    path = tmp_path / "ZImageTurbo_quanto_bf16_int8.safetensors"
    _write_quanto(tiny_flat_layout["transformer"], path)
    monkeypatch.setattr(loading, "_QUANTIZED_LOADERS", {})
    with pytest.raises(CheckpointError, match="int8 quanto file.*quantization module") as err:
        load_transformer(path, None, F32)
    assert str(path) in str(err.value)

    calls = []

    def fake_loader(
        model: torch.nn.Module, files: list[Path], dtype: torch.dtype | None, device: str
    ) -> torch.nn.Module:
        calls.append((model.config, files, dtype))
        return model

    loading.register_quantized_loader(fake_loader)
    load_transformer(path, None, torch.bfloat16)
    assert calls == [(TINY_CONFIG, [path], torch.bfloat16)]  # config inferred through the `_data` suffix


def test_text_encoder_quanto_recognised(tiny_flat_layout: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    state = load_file(tiny_flat_layout["text_encoder"])
    weight = state.pop("model.layers.0.self_attn.q_proj.weight")
    state["model.layers.0.self_attn.q_proj.weight._data"] = weight.to(torch.int8)
    state["model.layers.0.self_attn.q_proj.weight._scale"] = torch.ones(weight.shape[0], 1)
    path = tmp_path / "qwen3_quanto_bf16_int8.safetensors"
    save_file(state, path, metadata={"quantization_format": "quanto"})
    monkeypatch.setattr(loading, "_QUANTIZED_LOADERS", {})
    with pytest.raises(CheckpointError, match="int8 quanto"):
        load_text_encoder(path, tiny_flat_layout["text_encoder_config"], F32)


# -- converter --------------------------------------------------------------------------------------


def test_converter_tables_invert_the_comfy_export(tiny_flat_layout: dict[str, Path]) -> None:
    state = load_file(tiny_flat_layout["transformer"])
    for fuse_ffn in (False, True):
        comfy = comfy_state_dict(state, fuse_ffn=fuse_ffn)
        assert detect_layout(comfy) == "comfy" and detect_layout(state) == "diffusers"
        # Prefixes are stripped per key: a file that mixes prefixed and bare keys converts too.
        mixed = {(strip_prefixes(k) if i % 2 else k): v for i, (k, v) in enumerate(comfy.items())}
        for variant in (comfy, mixed):
            back = convert_state_dict(variant)
            assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_comfy_file_agrees_with_diffusers_single_file_converter(
    tiny_comfy_file: Path, tiny_diffusers_folder: Path
) -> None:
    """diffusers' own converter (qkv rows q, k, v) is the reference for the ComfyUI layout, not our tables:
    it reads our fixture into the diffusers weights, and our converter must give the same tensors."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    reference = load_file(tiny_diffusers_folder / "transformer" / "diffusion_pytorch_model.safetensors")
    theirs = convert_z_image_transformer_checkpoint_to_diffusers(load_file(tiny_comfy_file))
    assert theirs.keys() == reference.keys() and all(torch.equal(theirs[k], reference[k]) for k in reference)
    ours = convert_state_dict(load_file(tiny_comfy_file))
    assert ours.keys() == theirs.keys()
    assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []
    model = ZImageTransformer2DModel.from_single_file(
        str(tiny_comfy_file), config=str(tiny_diffusers_folder), subfolder="transformer", local_files_only=True
    )
    ours_loaded = load_transformer(tiny_comfy_file, None, F32).state_dict()
    assert all(torch.equal(ours_loaded[k], v) for k, v in model.state_dict().items())


def test_fused_ffn_means_what_diffusers_swiglu_feedforward_means(tiny_comfy_fused_ffn_file: Path) -> None:
    """A fused `feed_forward.net.0.proj` / `net.2` pair is diffusers' `FeedForward(activation_fn="swiglu")`:
    that module, given the file's two tensors, must compute what our loaded block's FFN computes.
    (diffusers' Z-Image single-file converter does not handle a fused FFN, so this is the reference.)"""
    from diffusers.models.attention import FeedForward

    state = load_file(tiny_comfy_fused_ffn_file)
    model = load_transformer(tiny_comfy_fused_ffn_file, None, F32)
    dim, hidden = TINY_CONFIG.dim, TINY_CONFIG.ffn_dim
    x = torch.randn(5, dim, generator=torch.Generator().manual_seed(2))
    for block, ffn in (("layers.1", model.layers[1].feed_forward), ("noise_refiner.0", model.noise_refiner[0].feed_forward)):
        prefix = f"model.diffusion_model.{block}.feed_forward."
        reference = FeedForward(dim, inner_dim=hidden, activation_fn="swiglu", bias=False)
        reference.load_state_dict({"net.0.proj.weight": state[prefix + "net.0.proj.weight"],
                                   "net.2.weight": state[prefix + "net.2.weight"]})  # fmt: skip
        with torch.no_grad():
            expected, got = reference(x), ffn(x)
        assert expected.abs().mean() > 1e-3 and torch.allclose(got, expected, rtol=1e-5, atol=1e-6), block


def test_unexpected_keys_are_reported_and_scaled_fp8_refused(
    tiny_comfy_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = load_file(tiny_comfy_file)
    path = tmp_path / "extra.safetensors"
    save_file({**state, "model.diffusion_model.layers.0.extra.weight": torch.zeros(2)}, path)
    with caplog.at_level(logging.WARNING, logger="models.z_image.loading_z_image"):
        load_transformer(path, None, F32)
    assert "unexpected keys: ['model.diffusion_model.layers.0.extra.weight']" in caplog.text

    fp8 = {**state, "model.diffusion_model.layers.0.attention.qkv.scale_weight": torch.ones(1)}
    save_file(fp8, path)
    with pytest.raises(CheckpointError, match="scaled-fp8"):
        load_transformer(path, None, F32)


def test_folder_without_config_json_infers_it(tiny_diffusers_folder: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_diffusers_folder / "transformer" / "diffusion_pytorch_model.safetensors", tmp_path)
    assert load_transformer(tmp_path, None, F32).config == TINY_CONFIG


def test_no_second_copy_built_on_meta_and_tensors_assigned(tiny_flat_layout: dict[str, Path], monkeypatch) -> None:
    """The model is built on meta and the loaded tensors become the parameters themselves (assign=True):
    at no point do a full state dict and a full model exist side by side."""
    seen: dict[str, object] = {}
    original = ZImageTransformer.load_state_dict

    def spy(self: ZImageTransformer, state_dict: dict, *args, **kwargs):
        seen["meta_before"] = all(p.is_meta for p in self.parameters())
        seen["ptrs"] = {k: v.data_ptr() for k, v in state_dict.items()}
        return original(self, state_dict, *args, **kwargs)

    monkeypatch.setattr(ZImageTransformer, "load_state_dict", spy)
    model = load_transformer(tiny_flat_layout["transformer"], None, F32)
    assert seen["meta_before"] is True
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == seen["ptrs"]
