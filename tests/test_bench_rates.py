"""The benches' shared timing helpers (bench/rates.py): alternating order, and one matmul reference."""

from __future__ import annotations

import pytest
import torch

from bench import rates


def test_time_alternating_reverses_the_order_each_round_with_a_burst_first(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(rates.MATMUL_N, "cpu", 8)  # tiny products: this test checks the order, not a rate
    reference = rates.MatmulReference("cpu", torch.float32)
    burst = reference.burst
    monkeypatch.setattr(reference, "burst", lambda: (calls.append("matmul"), burst())[1])
    timed = rates.time_alternating(
        {"ours": lambda: calls.append("ours"), "diffusers": lambda: calls.append("diffusers")}, "cpu", 3, reference
    )
    warm_up = ["ours", "diffusers"]
    rounds = ["matmul", "ours", "diffusers", "matmul", "diffusers", "ours", "matmul", "ours", "diffusers"]
    assert calls == warm_up + rounds
    assert set(timed) == {"ours", "diffusers"} and all(0 <= s < 1 and peak == 0 for s, peak in timed.values())
    assert reference.count == 3 * rates.MATMUL_REPS and reference.rate == 2 * 8**3 / reference.best_s
    assert reference.describe() == "matmul reference: best of 30 at n=8, timed between the forwards"
