"""`wgp.py --merge-loras A.safetensors:0.7 B.safetensors:0.5 --output merged.safetensors [--rank R]`.

Per module: D = sum_i w_i * dW_i (every dialect and kind goes through the family normaliser first),
then D is re-factored to rank R by SVD (the best rank-R approximation) and written as a LoRA in the
diffusers/PEFT dialect (`transformer.<module>.lora_A/lora_B.weight` + `.alpha` = R, i.e. scale 1).
When every input is a plain LoRA, D = B_cat @ A_cat is factored through two thin QRs and an SVD of
the small (sum r x sum r) core, so the merge is exact at the default rank (the sum of input ranks)
and never forms an (out, in) matrix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.errors import CheckpointError, SettingsError
from common.lora_delta import LoraDelta
from host.atomic import atomic_write
from host.lora import LoraNormalizer, load_lora, resolve_lora

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeInput:
    path: Path
    weight: float


@dataclass
class MergeResult:
    output: Path
    modules: int
    rank: int  # the largest rank written
    energy_kept: float  # min over modules of ||D_R||^2 / ||D||^2 (1.0 = exact)
    inputs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"merged {len(self.inputs)} LoRA(s) into {self.output}: {self.modules} modules, rank <= {self.rank}, "
            f"worst-module energy kept {self.energy_kept:.4f}"
        )


def parse_merge_input(text: str) -> MergeInput:
    """`path[:weight]` (weight 1.0 when absent; a drive letter `C:` is not mistaken for a weight)."""
    path, sep, weight = text.rpartition(":")
    if sep and path and "/" not in weight and "\\" not in weight:
        try:
            return MergeInput(Path(path), float(weight))
        except ValueError:
            raise SettingsError(
                f"--merge-loras {text!r}: the weight after ':' must be a number (e.g. A.safetensors:0.7)"
            ) from None
    return MergeInput(Path(text), 1.0)


def _factor(
    parts: list[tuple[float, LoraDelta]], rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Weighted sum of deltas -> (up (out, R), down (R, in), energy kept, the largest rank this module can have).

    That largest rank is the number of singular values: the sum of the input ranks for plain LoRAs, else
    min(out, in). A larger `rank` is capped to it (the result is then exact).
    """
    if all(d.kind == "lora" for _, d in parts):
        up = torch.cat([w * d.scale * d.factors["up"].float() for w, d in parts], dim=1)  # (out, sum r)
        down = torch.cat([d.factors["down"].float() for _, d in parts], dim=0)  # (sum r, in)
        qb, rb = torch.linalg.qr(up)
        qa, ra = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        u, vh = qb @ u, vh @ qa.T
    else:
        total = sum(w * d.weight() for w, d in parts)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
    default = sum(d.rank or min(d.shape) for _, d in parts)
    r = max(1, min(rank or default, s.numel()))
    energy = float((s[:r] ** 2).sum() / (s**2).sum().clamp_min(1e-30))
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r], energy, s.numel()


def merge_loras(
    inputs: Sequence[MergeInput], normalizer: LoraNormalizer, rank: int | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """The merged LoRA as a diffusers/PEFT state dict, and the worst module's kept energy."""
    if rank is not None and rank < 1:
        raise SettingsError(f"--rank must be >= 1 (got {rank})")
    by_module: dict[str, list[tuple[float, LoraDelta]]] = {}
    for item in inputs:
        lora = load_lora(item.path, normalizer).lora
        for name, delta in lora.deltas.items():
            if delta.dora_scale is not None:
                raise CheckpointError(
                    f"{item.path.name}: DoRA LoRAs depend on the base weights and cannot be merged with others"
                )
            by_module.setdefault(name, []).append((item.weight, delta))
    sd: dict[str, torch.Tensor] = {}
    worst = 1.0
    capped: dict[str, int] = {}  # module -> the rank it was written at, below the requested one
    for name, parts in sorted(by_module.items()):
        up, down, energy, largest = _factor(parts, rank)
        worst = min(worst, energy)
        if rank is not None and rank > largest:
            capped[name] = largest
        sd[f"transformer.{name}.lora_A.weight"] = down.contiguous()
        sd[f"transformer.{name}.lora_B.weight"] = up.contiguous()
        sd[f"transformer.{name}.alpha"] = torch.tensor(float(down.shape[0]), device="cpu")
        biases = [w * d.bias.float() for w, d in parts if d.bias is not None]
        if biases:
            sd[f"transformer.{name}.diff_b"] = sum(biases)
    if capped:
        log.warning(
            "--rank %d is more than %d of %d modules can hold (the sum of their input ranks, or their size): "
            "those are written at rank %d to %d, which is exact; a lower --rank makes a smaller file",
            rank, len(capped), len(by_module), min(capped.values()), max(capped.values()),
        )  # fmt: skip
    return sd, worst


def write_lora_atomic(sd: dict[str, torch.Tensor], output: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then rename: never half a file at `output`."""
    atomic_write(output, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


def merge_main(
    specs: Sequence[str],
    output: Path,
    normalizer: LoraNormalizer,
    folders: Sequence[Path] = (),
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> MergeResult:
    """The CLI's `--merge-loras`: resolve names in the LoRA folders, merge, write atomically."""
    if not specs:
        raise SettingsError("--merge-loras needs at least one LoRA (e.g. A.safetensors:0.7 B.safetensors:0.5)")
    if output.suffix.lower() not in (".safetensors", ".sft"):
        raise SettingsError(f"--output {output}: the merged LoRA must be a .safetensors file")
    inputs = [parse_merge_input(s) for s in specs]
    inputs = [MergeInput(resolve_lora(i.path, folders), i.weight) for i in inputs]
    sd, energy = merge_loras(inputs, normalizer, rank)
    sd = {k: v.to(dtype) if v.dim() else v for k, v in sd.items()}
    sources = [f"{i.path.name}:{i.weight:g}" for i in inputs]
    write_lora_atomic(sd, output, {"format": "pt", "merged_from": json.dumps(sources), "rank": str(rank or "auto")})
    ranks = [v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight")]
    result = MergeResult(output, len(ranks), max(ranks, default=0), energy, sources)
    log.info("%s", result.summary())
    return result
