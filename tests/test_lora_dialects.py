"""Every LoRA dialect of REFERENCE.md section 6, written by the test, gives the output of a model whose
weights were merged by hand with the same delta (fp32, transformer level), at multipliers 1.0 and 0.5."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from lora_fixtures import DIALECTS, NORMALIZER, merged_by_hand, peft_with_header, random_lora, run, tiny_model
from safetensors.torch import save_file

from common.errors import CheckpointError
from host.lora import load_lora
from host.lora.apply import LoraRuntime, linear_shapes
from models.z_image.lora_z_image import normalize_lora

TOL = 1e-4  # fp32; outputs are O(1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(0)


def _write(tmp_path: Path, sd: dict[str, torch.Tensor], name: str = "lora.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _check(model: torch.nn.Module, lora, expected: dict[str, torch.Tensor], mult: float, merged: bool = False) -> None:
    reference = run(merged_by_hand(model, expected, mult))
    before = run(model)
    runtime = LoraRuntime(model, [lora], [[mult]], merged=merged)
    try:
        out = run(model)
    finally:
        runtime.detach()
    assert (out - reference).abs().max().item() < TOL
    assert (reference - before).abs().max().item() > 0.1  # the delta is not negligible
    assert torch.equal(run(model), before)  # unloading restores the exact outputs


@pytest.mark.parametrize("mult", [1.0, 0.5])
@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_every_lora_dialect_matches_hand_merged_weights(model, tmp_path: Path, dialect: str, mult: float) -> None:
    lora = random_lora(model)
    path = _write(tmp_path, DIALECTS[dialect](lora))
    loaded = load_lora(path, NORMALIZER, linear_shapes(model))
    linear_names = list(linear_shapes(model))
    assert loaded.report.modules_matched == len(linear_names)
    assert set(loaded.report.modules) == set(linear_names)  # incl. adaLN, t_embedder, embedders, final layer
    expected = {m: lora.delta(m) for m in lora.down}
    _check(model, loaded.lora, expected, mult)


def test_merged_mode_matches_too(model, tmp_path: Path) -> None:
    lora = random_lora(model)
    loaded = load_lora(_write(tmp_path, DIALECTS["musubi"](lora)), NORMALIZER, linear_shapes(model))
    _check(model, loaded.lora, {m: lora.delta(m) for m in lora.down}, 0.5, merged=True)


TARGETS = [
    "layers.0.attention.to_q", "layers.1.feed_forward.w1", "noise_refiner.0.adaLN_modulation.0", "cap_embedder.1"
]


def _targets(model: torch.nn.Module) -> list[str]:
    return TARGETS


def _shape(model: torch.nn.Module, name: str) -> tuple[int, int]:
    return linear_shapes(model)[name]


@pytest.mark.parametrize("mult", [1.0, 0.5])
@pytest.mark.parametrize("form", ["full", "decomposed", "tucker"])
def test_lycoris_lokr(model, mult: float, form: str) -> None:
    gen = torch.Generator().manual_seed(5)
    sd, expected = {}, {}
    for name in _targets(model):
        out, inp = _shape(model, name)
        o1, i1 = 2, 8
        o2, i2 = out // o1, inp // i1
        w1 = torch.randn(o1, i1, generator=gen) * 0.3
        key = f"lycoris_{name.replace('.', '_')}"
        sd[f"{key}.lokr_w1"] = w1
        if form == "full":
            w2 = torch.randn(o2, i2, generator=gen) * 0.3
            sd[f"{key}.lokr_w2"], scale = w2, 1.0
            sd[f"{key}.alpha"] = torch.tensor(7.0)  # ignored for full factors (LyCORIS: scale 1)
        elif form == "decomposed":
            a, b = torch.randn(o2, 2, generator=gen), torch.randn(2, i2, generator=gen) * 0.3
            sd[f"{key}.lokr_w2_a"], sd[f"{key}.lokr_w2_b"] = a, b
            sd[f"{key}.alpha"], scale, w2 = torch.tensor(1.0), 0.5, a @ b
        else:  # Tucker: w2 = einsum(t, w2_b, w2_a); w2_a is (rank, o2) here, as LyCORIS stores it
            t = torch.randn(2, 2, 1, 1, generator=gen)
            a, b = torch.randn(2, o2, generator=gen), torch.randn(2, i2, generator=gen) * 0.3
            sd[f"{key}.lokr_t2"], sd[f"{key}.lokr_w2_a"], sd[f"{key}.lokr_w2_b"] = t, a, b
            scale, w2 = 1.0, a.T @ t[:, :, 0, 0] @ b
        expected[name] = torch.kron(w1, w2) * scale
    lora = normalize_lora(sd, linear_shapes(model))
    assert "LyCORIS LoKr" in lora.dialects
    _check(model, lora, expected, mult)


@pytest.mark.parametrize("mult", [1.0, 0.5])
def test_lycoris_loha(model, mult: float) -> None:
    gen = torch.Generator().manual_seed(6)
    sd, expected = {}, {}
    for name in _targets(model):
        out, inp = _shape(model, name)
        f = {n: torch.randn(*s, generator=gen) * 0.5 for n, s in
             {"w1_a": (out, 3), "w1_b": (3, inp), "w2_a": (out, 3), "w2_b": (3, inp)}.items()}
        sd.update({f"diffusion_model.{name}.hada_{n}": v for n, v in f.items()})
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(1.5)
        expected[name] = (f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"]) * 0.5
    lora = normalize_lora(sd, linear_shapes(model))
    assert "LyCORIS LoHa" in lora.dialects
    _check(model, lora, expected, mult)


@pytest.mark.parametrize("mult", [1.0, 0.5])
@pytest.mark.parametrize("layout", ["row", "peft_vector", "column"])
def test_dora(model, mult: float, layout: str) -> None:
    """W' = m * (W + dW) / ||W + dW||; at multiplier s, W + s * (W' - W) (ComfyUI / LyCORIS rule)."""
    gen = torch.Generator().manual_seed(7)
    modules = dict(model.named_modules())
    sd, expected = {}, {}
    for name in _targets(model):
        out, inp = _shape(model, name)
        down, up = torch.randn(4, inp, generator=gen) / 8, torch.randn(out, 4, generator=gen) * 0.3
        w = modules[name].weight.detach() + up @ down
        if layout == "column":
            norm, m = w.norm(dim=0, keepdim=True), torch.rand(1, inp, generator=gen) + 0.5
        else:
            norm, m = w.norm(dim=1, keepdim=True), torch.rand(out, 1, generator=gen) + 0.5
        key = "dora_scale" if layout != "peft_vector" else "lora_magnitude_vector"
        sd[f"transformer.{name}.{key}"] = m if layout != "peft_vector" else m[:, 0]
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up
        expected[name] = w * (m / norm) - modules[name].weight.detach()
    lora = normalize_lora(sd, linear_shapes(model))
    assert "DoRA" in lora.dialects
    _check(model, lora, expected, mult)
    _check(model, lora, expected, mult, merged=True)


def test_full_diff_and_bias(model) -> None:
    gen = torch.Generator().manual_seed(8)
    name = "t_embedder.mlp.0"
    out, inp = _shape(model, name)
    diff, diff_b = torch.randn(out, inp, generator=gen) * 0.1, torch.randn(out, generator=gen)
    lora = normalize_lora({f"diffusion_model.{name}.diff": diff, f"diffusion_model.{name}.diff_b": diff_b})
    reference = merged_by_hand(model, {name: diff * 0.5}, 1.0)
    with torch.no_grad():
        dict(reference.named_modules())[name].bias += 0.5 * diff_b
    runtime = LoraRuntime(model, [lora], [[0.5]])
    assert (run(model) - run(reference)).abs().max().item() < TOL
    runtime.detach()


def test_text_encoder_keys_are_reported_not_applied(model) -> None:
    sd = DIALECTS["musubi"](random_lora(model))
    sd["lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 8)
    lora = normalize_lora(sd, linear_shapes(model))
    assert list(lora.ignored) == ["lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    assert "text-encoder" in next(iter(lora.ignored.values()))


@pytest.mark.parametrize(
    ("key", "model_name"),
    [
        ("diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight", "Flux"),
        ("transformer.single_transformer_blocks.3.attn.to_q.lora_A.weight", "Flux"),
        ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", "Wan"),
        ("lora_unet_blocks_3_cross_attn_k.lora_down.weight", "Wan"),
        ("transformer.transformer_blocks.0.img_mod.1.lora_A.weight", "Qwen-Image"),
    ],
)
def test_lora_for_another_model_is_refused(model, key: str, model_name: str) -> None:
    sd = {**DIALECTS["ai-toolkit"](random_lora(model)), key: torch.zeros(4, 8)}
    with pytest.raises(CheckpointError, match=f"this LoRA is for {model_name}"):
        normalize_lora(sd, linear_shapes(model))


def test_lumina2_shapes_are_refused(model) -> None:
    # Lumina 2: same module names, width 2304, grouped-query fused qkv (2304 + 2 * 768 rows).
    fused = {"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.zeros(4, 2304),
             "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.zeros(3840, 4)}
    with pytest.raises(CheckpointError, match="this LoRA is for Lumina 2"):
        normalize_lora(fused)
    plain = {"diffusion_model.layers.0.attention.to_out.0.lora_A.weight": torch.zeros(4, 2304),
             "diffusion_model.layers.0.attention.to_out.0.lora_B.weight": torch.zeros(2304, 4)}
    with pytest.raises(CheckpointError, match="this LoRA is for Lumina 2"):
        normalize_lora(plain, linear_shapes(model))


def test_unmatched_key_is_an_error_naming_it(model) -> None:
    sd = DIALECTS["ai-toolkit"](random_lora(model))
    sd["diffusion_model.layers.0.mystery.lora_A.weight"] = torch.zeros(4, 64)
    sd["diffusion_model.layers.0.mystery.lora_B.weight"] = torch.zeros(64, 4)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mystery\.lora_A\.weight.*not a Linear layer"):
        normalize_lora(sd, linear_shapes(model))
    with pytest.raises(CheckpointError, match=r"do not map to Z-Image: 'something\.odd'"):
        normalize_lora({"something.odd": torch.zeros(1)})


def test_incomplete_and_conflicting_keys(model) -> None:
    with pytest.raises(CheckpointError, match=r"lacks \['up'\]"):
        normalize_lora({"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 64)})
    both = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 64),
            "diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(CheckpointError, match="both map to layers.0.attention.to_q.down"):
        normalize_lora(both)
    wrong = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 32),
             "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(CheckpointError, match="trained for a different model size"):
        normalize_lora(wrong, linear_shapes(model))


def test_unflatten_protects_underscore_names() -> None:
    from models.z_image.lora_z_image import _parse_key

    cases = {
        "lora_unet_layers_12_attention_to_out_0.lora_down.weight": "layers.12.attention.to_out.0",
        "lora_unet_noise_refiner_1_adaLN_modulation_0.alpha": "noise_refiner.1.adaLN_modulation.0",
        "lora_unet__context_refiner_0_feed_forward_w3.lora_up.weight": "context_refiner.0.feed_forward.w3",
        "lora_unet_all_final_layer_2-1_adaLN_modulation_1.lora_up.weight": "all_final_layer.2-1.adaLN_modulation.1",
        "lora_unet_t_embedder_mlp_2.lora_up.weight": "t_embedder.mlp.2",
        "lora_unet_x_embedder.lora_up.weight": "all_x_embedder.2-1",
        "lora_unet_final_layer_linear.lora_up.weight": "all_final_layer.2-1.linear",
        "lora_unet_cap_embedder_1.lora_up.weight": "cap_embedder.1",
        "diffusion_model.layers.3.attention.wo.lora.up.weight": "layers.3.attention.to_out.0",
    }
    for key, module in cases.items():
        assert _parse_key(key)[0] == module, key


ATTENTION = re.compile(r"\.attention\.to_(q|k|v|out\.0)$")  # what diffusers' training scripts target


@pytest.mark.parametrize("prefix", ["transformer.", ""])  # a pipeline's save_lora_weights, a model's save_lora_adapter
def test_alpha_from_the_header_metadata(model, tmp_path: Path, prefix: str) -> None:
    """No `.alpha` tensors, `lora_alpha` 8 at r 4 in the header: scale 8 / 4 = 2 (to_q: alpha_pattern 2 -> 0.5)."""
    lora = random_lora(model)
    modules = [m for m in lora.down if ATTENTION.search(m)]
    config = {"r": 4, "lora_alpha": 8, "target_modules": modules, "alpha_pattern": {"to_q": 2}, "use_rslora": False}
    sd, header = peft_with_header(lora, modules, config, prefix)
    path = tmp_path / "trained.safetensors"
    save_file(sd, str(path), metadata=header)
    loaded = load_lora(path, NORMALIZER, linear_shapes(model))
    scale = {m: (2 if m.endswith(".to_q") else 8) / 4 for m in modules}
    _check(model, loaded.lora, {m: scale[m] * lora.up[m] @ lora.down[m] for m in modules}, 1.0)
    report = loaded.report
    assert (report.alpha, report.scale, report.alpha_source) == (8.0, 2.0, "metadata")
    assert "alpha 8 (from metadata), scale 2" in report.summary()


def test_rank_stabilised_lora_and_where_alpha_came_from(model, tmp_path: Path) -> None:
    lora = random_lora(model)
    modules = [m for m in lora.down if ATTENTION.search(m)]
    sd, header = peft_with_header(lora, modules, {"r": 4, "lora_alpha": 8, "use_rslora": True})
    save_file(sd, str(tmp_path / "rs.safetensors"), metadata=header)
    loaded = load_lora(tmp_path / "rs.safetensors", NORMALIZER, linear_shapes(model))
    _check(model, loaded.lora, {m: 8 / 2 * lora.up[m] @ lora.down[m] for m in modules}, 1.0)  # alpha / sqrt(r)
    sources = {}
    for dialect in ("diffusers", "ai-toolkit"):  # `.alpha` tensors; no alpha anywhere
        path = _write(tmp_path, DIALECTS[dialect](lora), f"{dialect}.safetensors")
        sources[dialect] = load_lora(path, NORMALIZER).report.alpha_source
    assert sources == {"diffusers": "tensor", "ai-toolkit": "default"}


@pytest.mark.parametrize(
    "header, message",
    [
        ({"transformer.r": 8, "transformer.lora_alpha": 8}, "says rank 8 for layers.0.attention.to_q, but its tensors have rank 4"),
        ({"transformer.lora_alpha": "8"}, "lora_alpha must be a positive number, got '8'"),
        ({"transformer.lora_alpha": 8, "transformer.alpha_pattern": {"to_(q": 1}}, "is not a regular expression"),
    ],
)
def test_bad_header_metadata_names_the_file(model, tmp_path: Path, header: dict, message: str) -> None:
    lora = random_lora(model)
    sd, _ = peft_with_header(lora, ["layers.0.attention.to_q"], {})
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(header)})
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        load_lora(path, NORMALIZER, linear_shapes(model))
    assert str(err.value).startswith("LoRA bad.safetensors: header 'lora_adapter_metadata'")
    save_file(sd, str(path), metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_lora(path, NORMALIZER, linear_shapes(model))
