"""The merge tool: weighted sum of deltas, re-factored by SVD, written as a diffusers/PEFT LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lora_fixtures import DIALECTS, NORMALIZER, random_lora, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from common.errors import CheckpointError, SettingsError
from host.lora import load_lora
from host.lora.merge import merge_main, parse_merge_input


def _save(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


def test_parse_inputs() -> None:
    assert parse_merge_input("A.safetensors:0.7").weight == 0.7
    assert parse_merge_input("A.safetensors") == parse_merge_input("A.safetensors:1")
    assert parse_merge_input("C:\\loras\\a.safetensors").path == Path("C:\\loras\\a.safetensors")
    with pytest.raises(SettingsError, match="must be a number"):
        parse_merge_input("A.safetensors:lots")


def test_merge_is_exact_at_the_default_rank(tmp_path: Path, model) -> None:
    a, b = random_lora(model, seed=2), random_lora(model, seed=3)
    _save(tmp_path / "a.safetensors", DIALECTS["musubi"](a))
    _save(tmp_path / "b.safetensors", DIALECTS["comfy-fused"](b))
    out = tmp_path / "merged.safetensors"
    result = merge_main(["a.safetensors:0.7", "b.safetensors:-0.5"], out, NORMALIZER, folders=[tmp_path])
    assert result.rank == 8 and result.energy_kept > 0.999999
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no leftovers
    merged = load_lora(out, NORMALIZER).lora
    assert merged.dialects == ["diffusers/PEFT"]
    for name, delta in merged.deltas.items():
        want = 0.7 * a.delta(name) - 0.5 * b.delta(name)
        assert torch.allclose(delta.weight(), want, atol=1e-5), name
    with safe_open(str(out), "pt") as f:
        assert "a.safetensors:0.7" in f.metadata()["merged_from"]


def test_lower_rank_is_the_best_approximation(tmp_path: Path, model) -> None:
    a = _save(tmp_path / "a.safetensors", DIALECTS["diffusers"](random_lora(model, seed=2)))
    b = _save(tmp_path / "b.safetensors", DIALECTS["diffusers"](random_lora(model, seed=3)))
    out = tmp_path / "r3.safetensors"
    result = merge_main([f"{a}:1", f"{b}:1"], out, NORMALIZER, rank=3)
    assert result.rank == 3 and 0.3 < result.energy_kept < 1.0
    merged, sa, sb = (load_lora(p, NORMALIZER).lora for p in (out, a, b))
    name = "layers.0.feed_forward.w1"
    full = sa.deltas[name].weight() + sb.deltas[name].weight()
    u, s, vh = torch.linalg.svd(full)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(merged.deltas[name].weight(), best, atol=1e-4)


def test_lokr_inputs_and_dora_refused(tmp_path: Path, model) -> None:
    w1, w2 = torch.randn(2, 8), torch.randn(32, 8)
    lokr = _save(tmp_path / "k.safetensors", {"lycoris_layers_0_attention_to_q.lokr_w1": w1,
                                              "lycoris_layers_0_attention_to_q.lokr_w2": w2})
    out = tmp_path / "m.safetensors"
    merge_main([f"{lokr}:0.5"], out, NORMALIZER, rank=64)
    merged = load_lora(out, NORMALIZER).lora.deltas["layers.0.attention.to_q"]
    assert torch.allclose(merged.weight(), 0.5 * torch.kron(w1, w2), atol=1e-4)
    dora = _save(tmp_path / "d.safetensors", {"transformer.layers.0.attention.to_q.lora_A.weight": torch.randn(2, 64),
                                              "transformer.layers.0.attention.to_q.lora_B.weight": torch.randn(64, 2),
                                              "transformer.layers.0.attention.to_q.dora_scale": torch.ones(64, 1)})
    with pytest.raises(CheckpointError, match="DoRA"):
        merge_main([str(dora)], out, NORMALIZER)
    with pytest.raises(SettingsError, match="must be a .safetensors"):
        merge_main([str(lokr)], tmp_path / "x.ckpt", NORMALIZER)


def test_cli_flag(tmp_path: Path, model, capsys: pytest.CaptureFixture[str]) -> None:
    from host import cli

    a = _save(tmp_path / "a.safetensors", DIALECTS["musubi"](random_lora(model, seed=2)))
    b = _save(tmp_path / "b.safetensors", DIALECTS["ai-toolkit"](random_lora(model, seed=3)))
    out = tmp_path / "out" / "merged.safetensors"
    argv = ["--merge-loras", f"{a}:0.7", f"{b}:0.5", "--output", str(out), "--rank", "6"]
    assert cli.main(argv) == 0
    assert "merged 2 LoRA(s)" in capsys.readouterr().out
    assert load_lora(out, NORMALIZER).report.rank == 6
    assert cli.main(["--merge-loras", str(tmp_path / "missing.safetensors"), "--output", str(out)]) == 1
    assert "not exist" in capsys.readouterr().err


def test_a_rank_above_what_the_sum_holds_is_capped_with_a_warning(
    tmp_path: Path, model, caplog: pytest.LogCaptureFixture
) -> None:
    """Two rank-4 LoRAs: every module's sum has at most 8 directions, so --rank 64 writes rank 8 (exact) and
    says so; a rank the sum can hold (3) is written as asked, silently."""
    a = _save(tmp_path / "a.safetensors", DIALECTS["diffusers"](random_lora(model, seed=2)))
    b = _save(tmp_path / "b.safetensors", DIALECTS["diffusers"](random_lora(model, seed=3)))
    out = tmp_path / "r64.safetensors"
    with caplog.at_level(logging.WARNING, logger="host.lora.merge"):
        result = merge_main([f"{a}:1", f"{b}:1"], out, NORMALIZER, rank=64)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert result.rank == 8 and result.energy_kept > 0.999999
    assert len(warnings) == 1 and warnings[0].startswith("--rank 64 is more than") and "rank 8 to 8" in warnings[0]
    assert f"of {result.modules} modules" in warnings[0]
    assert load_lora(out, NORMALIZER).report.rank == 8
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="host.lora.merge"):
        assert merge_main([f"{a}:1", f"{b}:1"], out, NORMALIZER, rank=3).rank == 3
        assert merge_main([f"{a}:1", f"{b}:1"], out, NORMALIZER).rank == 8  # the default rank: nothing to say
    assert not caplog.records


def test_cli_rank_above_the_sum_warns(tmp_path: Path, model, caplog: pytest.LogCaptureFixture) -> None:
    from host import cli

    a = _save(tmp_path / "a.safetensors", DIALECTS["musubi"](random_lora(model, seed=2)))
    b = _save(tmp_path / "b.safetensors", DIALECTS["ai-toolkit"](random_lora(model, seed=3)))
    out = tmp_path / "cli.safetensors"
    with caplog.at_level(logging.WARNING, logger="host.lora.merge"):
        assert cli.main(["--merge-loras", f"{a}:0.7", f"{b}:0.5", "--output", str(out), "--rank", "64"]) == 0
    assert any(r.getMessage().startswith("--rank 64 is more than") for r in caplog.records)
    assert load_lora(out, NORMALIZER).report.rank == 8
