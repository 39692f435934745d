"""LoRAs on the host side (family-agnostic): folders, files, load reports, multipliers, and the seam
that applies LoRA files to a loaded model.

Keys are normalised by the family (`handler.normalize_lora(state_dict, target_shapes)`, e.g.
models/z_image/lora_z_image.py); applying is host/lora/apply.py; `.lset` files are host/lora/sets.py;
the merge tool is host/lora/merge.py.

Folders: the root is `loras/` (`--loras DIR`); each family has its own (`handler.get_lora_dir`, e.g.
`loras/z_image/`, `--lora-dir-z-image DIR`). Names resolve inside those folders only; a file elsewhere
loads only when the user gives its absolute path. Only safetensors files load: pickle formats can run
code when opened.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open

from common.errors import CheckpointError, SettingsError
from common.lora_delta import NormalizedLora
from host.lora.apply import LoraRuntime, linear_shapes
from host.lora.metadata import apply_adapter_metadata, read_adapter_metadata
from host.registry import REPO_ROOT
from host.transforms import component, hooks_of

log = logging.getLogger(__name__)

DEFAULT_LORA_ROOT = REPO_ROOT / "loras"
LORA_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
# Multipliers beyond this only overflow the weights (1e308 x a delta is inf in any float format); useful ones are ~0-2.
MAX_MULTIPLIER = 100.0


class LoraNormalizer(Protocol):
    """What a family handler offers for LoRAs (Z-Image: `normalize_lora` in lora_z_image.py)."""

    def normalize_lora(
        self, state_dict: Mapping[str, torch.Tensor], target_shapes: Mapping[str, tuple[int, int]] | None = None
    ) -> NormalizedLora: ...


# -- folders ------------------------------------------------------------------------------------


def register_lora_root_arg(parser: argparse.ArgumentParser) -> None:
    """`--loras DIR`: the root LoRA folder (families' folders default to sub-folders of it)."""
    parser.add_argument("--loras", type=Path, metavar="DIR", help=f"root LoRA folder (default: {DEFAULT_LORA_ROOT})")


def lora_root(args: argparse.Namespace | None) -> Path:
    chosen = getattr(args, "loras", None) if args is not None else None
    return Path(chosen) if chosen else DEFAULT_LORA_ROOT


class LoraLibrary:
    """The LoRA files of one folder, listed recursively once and again on `rescan()`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._files: list[str] | None = None

    def files(self) -> list[str]:
        """Paths relative to the folder (posix), sorted; cached until `rescan`."""
        if self._files is None:
            self.rescan()
        return list(self._files or [])

    def rescan(self) -> list[str]:
        found = []
        if self.folder.is_dir():
            found = [p for p in self.folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file()]
        self._files = sorted(p.relative_to(self.folder).as_posix() for p in found)
        return list(self._files)


def check_lora_suffix(path: Path) -> None:
    """Refuse pickle files (they can run code) and anything that is not safetensors."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path.name}: {suffix} is a pickle format, and loading a pickle can run arbitrary code; it is refused. "
            "Convert it to .safetensors (or get the .safetensors version from its author)"
        )
    if suffix not in LORA_SUFFIXES:
        got = suffix or "no suffix"
        raise CheckpointError(f"{path.name}: a LoRA must be a .safetensors or .sft file (got {got!r})")


def resolve_lora(name: str | Path, folders: Sequence[Path]) -> Path:
    """A LoRA name -> its file: relative names inside `folders` (first match), absolute paths as given.

    A relative name may not climb out of its folder (`../x.safetensors`): absolute paths are the only
    way to load from elsewhere, so a task file cannot reach files the user did not name.
    """
    path = Path(name).expanduser()
    check_lora_suffix(path)
    if path.is_absolute():
        if not path.is_file():
            raise CheckpointError(f"LoRA file {path} does not exist")
        return path
    for folder in folders:
        try:
            candidate = (folder / path).resolve()
        except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError before Python 3.13, OSError after)
            raise CheckpointError(f"LoRA {str(name)!r} in {folder} cannot be resolved ({err}): fix or remove the link") from None
        if not candidate.is_relative_to(Path(folder).resolve()):
            raise CheckpointError(
                f"LoRA name {str(name)!r} points outside the LoRA folder {folder}; give an absolute path"
            )
        if candidate.is_file():
            return candidate
    where = ", ".join(str(f) for f in folders) or "no folder"
    raise CheckpointError(
        f"LoRA {str(name)!r} not found in {where} (rescan after adding files, or give an absolute path)"
    )


# -- files and reports --------------------------------------------------------------------------


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors LoRA; a truncated or corrupt file is an error naming it."""
    path = Path(path)
    check_lora_suffix(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"LoRA file {path} could not be read ({err}); it is truncated or not a safetensors file: download it again"
        ) from err
    if not tensors:
        raise CheckpointError(f"LoRA file {path} holds no tensors")
    check_finite(tensors, f"LoRA file {path}")
    return tensors


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """A NaN or inf weight turns every image black or grey: refuse the file, naming the first bad tensor."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{what}: tensor {bad[0]!r}{more} holds NaN or infinite values (a diverged training or a damaged "
            "file): it cannot be used; train or download it again"
        )


@dataclass
class LoraReport:
    """What one LoRA file did: shown by the CLI, the API and the web UI."""

    name: str
    path: str
    dialect: str
    modules: list[str]
    kinds: dict[str, int]  # e.g. {"lora": 210} or {"lokr": 120, "lora": 4}
    rank: int | None  # the most common rank (None: full-rank factors only)
    ranks: list[int]
    alpha: float | None  # the most common alpha (None: no alpha in the file, i.e. alpha = rank)
    scale: float  # the most common alpha / rank
    dora: bool
    not_applied: dict[str, str] = field(default_factory=dict)  # key -> why
    multiplier: str = "1.0"
    # Where the alphas came from: "tensor" (.alpha keys), "metadata" (the header's lora_adapter_metadata),
    # "default" (neither: alpha = rank, scale 1); several joined with " + " when modules differ.
    alpha_source: str = "default"

    @property
    def modules_matched(self) -> int:
        return len(self.modules)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        alpha = "none (= rank)" if self.alpha is None else f"{self.alpha:g} (from {self.alpha_source})"
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        extra = f"; {len(self.not_applied)} key(s) not applied" if self.not_applied else ""
        return (
            f"LoRA {self.name} [{self.dialect}]: {self.modules_matched} modules ({kinds}), rank {self.rank}, "
            f"alpha {alpha}, scale {self.scale:g}{', DoRA' if self.dora else ''}, multiplier {self.multiplier}{extra}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "modules_matched": self.modules_matched}


@dataclass
class LoadedLora:
    path: Path
    lora: NormalizedLora
    report: LoraReport


def make_report(path: Path, lora: NormalizedLora) -> LoraReport:
    deltas = list(lora.deltas.values())
    ranks = [d.rank for d in deltas if d.rank is not None]
    alphas = [d.alpha for d in deltas]
    return LoraReport(
        name=Path(path).name,
        path=str(path),
        dialect=" + ".join(lora.dialects) or "unknown",
        modules=sorted(lora.deltas),
        kinds=dict(Counter(d.kind for d in deltas)),
        rank=Counter(ranks).most_common(1)[0][0] if ranks else None,
        ranks=sorted(set(ranks)),
        alpha=Counter(alphas).most_common(1)[0][0] if alphas else None,
        alpha_source=" + ".join(sorted({_alpha_source(d) for d in deltas})) or "default",
        scale=Counter(d.scale for d in deltas).most_common(1)[0][0] if deltas else 1.0,
        dora=any(d.dora_scale is not None for d in deltas),
        not_applied=dict(lora.ignored),
    )


def _alpha_source(delta: Any) -> str:
    return delta.alpha_source or ("tensor" if delta.alpha is not None else "default")


def load_lora(
    path: Path, normalizer: LoraNormalizer, target_shapes: Mapping[str, tuple[int, int]] | None = None
) -> LoadedLora:
    """Read + normalise one LoRA file; errors name the file."""
    state_dict = read_lora_file(path)
    try:
        lora = normalizer.normalize_lora(state_dict, target_shapes)
        metadata = read_adapter_metadata(path)
        if metadata is not None:
            apply_adapter_metadata(lora, metadata)
    except CheckpointError as err:
        raise CheckpointError(f"LoRA {Path(path).name}: {err}") from err
    report = make_report(path, lora)
    for key, why in lora.ignored.items():
        log.warning("LoRA %s: key %s not applied: %s", report.name, key, why)
    return LoadedLora(Path(path), lora, report)


# -- multipliers --------------------------------------------------------------------------------


def parse_multipliers(text: str | Sequence[Any], n_loras: int) -> list[list[float]]:
    """Wan2GP's syntax -> per LoRA, a list of values (one = constant, k = schedule over the steps).

    "1.0 0.5" = one value per LoRA (space or newline separated); "1,0.5,0" = a per-step schedule,
    stretched over the steps; lines starting with '#' are comments; missing values are 1.0.
    """
    if isinstance(text, str):
        lines = [ln for ln in text.splitlines() if not ln.strip().startswith("#")]
        tokens = " ".join(lines).split()
    else:
        tokens = [str(v) for v in text]
    if len(tokens) > n_loras:
        raise SettingsError(
            f"loras_multipliers has {len(tokens)} values for {n_loras} LoRA(s): give one per LoRA, space separated"
        )
    out = []
    for token in tokens:
        if ";" in token:
            raise SettingsError(f"loras_multipliers {token!r}: ';' phases are for two-model families; use a,b,c steps")
        try:
            out.append([float(v) for v in token.split(",") if v != ""])
        except ValueError:
            raise SettingsError(
                f"loras_multipliers: {token!r} is not a number or a comma-separated list of numbers (e.g. 0.8 or 1,0.5)"
            ) from None
        if not out[-1]:
            raise SettingsError(f"loras_multipliers: {token!r} has no value")
        if not all(abs(v) <= MAX_MULTIPLIER for v in out[-1]):  # also false for nan
            raise SettingsError(
                f"loras_multipliers: {token!r} must be finite numbers between -{MAX_MULTIPLIER:g} and {MAX_MULTIPLIER:g} "
                "(1.0 = the LoRA as trained)"
            )
    return out + [[1.0]] * (n_loras - len(out))


# -- the seam the session calls -----------------------------------------------------------------


@dataclass
class LoraTransform:
    """LoRA files on a loaded model's denoiser (`target`, a component name; a transform, host/transforms.py).

    Runtime mode adds PyTorch forward hooks to the matched Linears (the weights stay untouched); merged mode
    adds the deltas into the weights and restores them on removal. Per-step schedules follow the model's
    `before_step` hook. `reports` holds one LoraReport per file once applied. Any error while loading
    leaves the model as it was.
    """

    paths: Sequence[Path]
    multipliers: str | Sequence[Any]
    normalizer: LoraNormalizer | None = None
    merged: bool = False
    target: str = "transformer"  # the component LoRAs apply to (the family's denoiser)
    name: str = "loras"
    reversible: bool = True
    runtime: LoraRuntime | None = None
    reports: list[LoraReport] = field(default_factory=list)
    _loaded: Any = field(default=None, repr=False)  # (transformer, schedules, files) between load and apply

    def load(self, model: Any) -> None:
        """Read, check and normalise the files for this model (nothing attached yet: an error here leaves
        the model and any LoRAs on it untouched). `apply` calls it when it was not called before."""
        target = component(model, self.target)
        if not isinstance(target, torch.nn.Module):
            raise SettingsError(f"this model has no `{self.target}` module to apply LoRAs to")
        schedules = parse_multipliers(self.multipliers, len(self.paths))
        if hooks_of(model) is None and any(len(set(s)) > 1 for s in schedules):
            raise SettingsError("per-step LoRA multipliers need a model with step hooks; give one value per LoRA")
        normalizer = self.normalizer or _find_normalizer(model)
        shapes = linear_shapes(target)
        self._loaded = (target, schedules, [load_lora(Path(p), normalizer, shapes) for p in self.paths])

    def apply(self, model: Any) -> None:
        if self._loaded is None:
            self.load(model)
        target, schedules, loaded = self._loaded
        self.runtime = LoraRuntime(target, [x.lora for x in loaded], schedules, merged=self.merged)
        for x, values in zip(loaded, schedules, strict=True):
            x.report.multiplier = ",".join(f"{v:g}" for v in values)
            log.info("%s", x.report.summary())
        self.reports, self._loaded = [x.report for x in loaded], None
        hooks = hooks_of(model)
        if hooks is not None:
            hooks.before_step.add(self.name, self.runtime.before_step)

    def remove(self, model: Any) -> None:
        """Detach: the outputs become exactly the original ones."""
        hooks = hooks_of(model)
        if hooks is not None:
            hooks.before_step.remove(self.name)
        if self.runtime is not None:
            self.runtime.detach()
            self.runtime = None
        self.reports = []


def apply_loras(
    model: Any,
    paths: Sequence[Path],
    multipliers: str | Sequence[Any],
    normalizer: LoraNormalizer | None = None,
    merged: bool = False,
) -> LoraTransform:
    """Attach LoRA files to a loaded model; returns the applied transform (`.remove(model)` detaches,
    `.reports` has the load reports). The session keeps it in its transform stack instead."""
    transform = LoraTransform(list(paths), multipliers, normalizer, merged)
    transform.apply(model)
    return transform


def _find_normalizer(model: Any) -> LoraNormalizer:
    """The handler of the family whose package built `model` (discovered, never imported by name)."""
    from host.registry import discover

    package = type(model).__module__.rsplit(".", 1)[0]
    for family in discover().families.values():
        handler = family.handler
        if type(handler).__module__.rsplit(".", 1)[0] == package and hasattr(handler, "normalize_lora"):
            return handler
    raise SettingsError(f"no family handler with normalize_lora for a {type(model).__name__}: LoRAs are not supported")
