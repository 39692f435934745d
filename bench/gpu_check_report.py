"""The GPU check's two bookends: which required packages are missing, and the one table of results.

    python bench/gpu_check_report.py packages                 # exit 2 (and one line) when a needed package is missing
    python bench/gpu_check_report.py table --out OUT          # OUT/results.jsonl + OUT/stages.jsonl -> OUT/table.md

`table` reads the rows the stages appended to OUT/results.jsonl (bench/gpu_check.py, bench/gpu_check_speed.py)
and what bench/gpu_check.sh recorded about each stage in OUT/stages.jsonl (exit status, seconds, limit), and
prints one markdown table, also written to OUT/table.md. A stage that timed out, failed or was skipped still
has its rows, saying so and naming its log, so a missing figure is never silent. Only the standard library:
it runs even where the stages could not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Distributions the stages import; the others of requirements.txt (web UI, browser tests, lint) are not needed.
NOT_NEEDED = {"gradio", "playwright", "ruff", "pytest"}
GIB = 2**30

Row = dict[str, Any]
Cell = tuple[str, str]  # (value, detail)


# -- packages -------------------------------------------------------------------------------------------


def requirements(path: Path) -> dict[str, str]:
    """name -> pinned version of each `name==version` line."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def check_packages(path: Path) -> tuple[list[str], list[str], list[str]]:
    """(missing needed, missing optional, installed at another version than pinned), as 'name' or 'name x != y'."""
    missing, optional, other = [], [], []
    for name, pinned in requirements(path).items():
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            (optional if name in NOT_NEEDED else missing).append(name)
            continue
        if version.split("+")[0] != pinned:
            other.append(f"{name} {version} (pinned {pinned})")
    return missing, optional, other


# -- table ----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSON lines file; a line that is not a JSON object (a truncated write) is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def stage_status(stage: Row | None, out: Path) -> str:
    """What became of a stage that left no row: never ran, skipped, timed out or failed (with its log)."""
    if stage is None:
        return "not run"
    if stage.get("skipped"):
        return f"skipped: {stage['skipped']}"
    log = out / "logs" / f"{stage['stage']}.log"
    code = stage.get("exit")
    if code in (124, 137):
        return f"timed out after {stage.get('limit')} s (log: logs/{log.name})"
    return f"failed, exit {code}: {last_line(log)} (log: logs/{log.name})"


def last_line(path: Path) -> str:
    """The last non-empty line of a log, shortened (| would break the table)."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return (lines[-1][:160] if lines else "no output").replace("|", "/")


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def transformer_cells(r: Row) -> list[Cell]:
    floor = (f"{r['floor_s']:.3f} s = 2 x {r['tflop_per_forward']:.1f} TFLOP at the measured "
             f"{r['matmul_tflops']:.0f} TFLOP/s")
    return [
        (f"{r['ours_s']:.3f} s/step", f"{pct(r['ours_of_floor'])} of the floor ({floor}); peak {r['ours_peak_gb']} GB"),
        (f"{r['diffusers_s']:.3f} s/step", f"{pct(r['diffusers_of_floor'])} of the floor; peak {r['diffusers_peak_gb']} GB"),
        (f"{r['ratio']:.3f}", f"best of {r['reps']} alternating rounds; outputs differ by {r['rel_diff']:.2g} (relative L2)"),
    ]


def profile_cell(r: Row) -> Cell:
    timing = (f"text encoding {r.get('text_encoding_s', 0):.2f} s, VAE decode {r.get('vae_decode_s', 0):.2f} s, "
              f"load {r.get('load_s', 0):.1f} s; {r['steps']} steps")
    if "peak_reserved_gb" in r:
        timing += (f"; peak allocated {r['peak_allocated_gb'] * 1e9 / GIB:.2f} GiB, reserved "
                   f"{r['peak_reserved_gb'] * 1e9 / GIB:.2f} GiB, context {r['context_gb'] * 1e9 / GIB:.2f} GiB")
    return f"{r['s_per_it']:.3f} s/step", timing


def vram_cell(r: Row) -> Cell:
    if "peak_reserved_gb" not in r:
        return "no CUDA", "peak VRAM is measured on a GPU only"
    total = (r["peak_reserved_gb"] + r["context_gb"]) * 1e9 / GIB
    return f"{total:.2f} GiB", f"reserved + CUDA context; goal < 8 GiB: {'met' if total < 8 else 'NOT met'}"


def lora_cell(r: Row) -> Cell:
    return (
        f"{r['with_s']:.3f} vs {r['without_s']:.3f} s/step",
        f"{100 * r['overhead']:+.1f}% (the LoRA's share of those Linears' FLOPs: {pct(r['flop_share'])}); "
        f"{r['modules_matched']} of {r['modules_written']} modules matched; attach {r['attach_s']:.1f} s; output moved "
        f"{r['lora_changes_output']:.2g}; removed = exact original output: {'yes' if r['removed_restores'] else 'NO'}",
    )


def compile_cell(r: Row) -> Cell:
    return (
        f"{r['compiled_s']:.3f} vs eager {r['eager_s']:.3f} s/step",
        f"{r['via']} ({r['blocks']} blocks, {r['backend']}, torch {r['torch']}): compiling {r['compile_s']:.1f} s "
        f"(first call {r['first_call_s']:.1f} s), x{r['speedup']:.2f}; output differs by {r['rel_diff']:.2g}",
    )


def product_compile_cell(r: Row) -> Cell:
    report = r.get("first_compile_report") or {}
    compiling = r.get("first_compile_s")
    how = f"compile used: {'yes' if report.get('used') else 'NO'}, {report.get('blocks', 0)} blocks"
    if report.get("reason"):
        how += f" ({report['reason']})"
    first = f"first generation {r.get('first_s_per_it', 0):.3f} s/step" + (
        f", compiling {compiling:.1f} s" if compiling is not None else ", no compile seconds reported")
    return f"{r['s_per_it']:.3f} s/step", f"{first}; {how}".replace("|", "/")


def attention_cell(r: Row) -> Cell:
    if "s" not in r:
        return "-", r["status"]
    return f"{r['s']:.3f} s/step", f"{r['status']}; output vs sdpa {r['rel_diff_vs_sdpa']:.2g}; peak {r['peak_gb']} GB"


def vae_cell(r: Row) -> Cell:
    if r.get("lean_peak_gb") is None:
        peaks = "no peak off CUDA"
    else:
        ratio = r["lean_peak_gb"] / r["stock_peak_gb"] if r["stock_peak_gb"] else float("nan")
        peaks = f"{r['lean_peak_gb']:.2f} vs {r['stock_peak_gb']:.2f} GB (x{ratio:.2f})"
    return peaks, (f"{r['size']}x{r['size']} {r['dtype']}, peak over weights + latent; {r['lean_s']:.3f} vs "
                   f"{r['stock_s']:.3f} s per decode; lean vs stock pixels: relative {r['rel_diff']:.2g}, "
                   f"largest {r['max_abs_diff']:.2g} (of [-1, 1])")


def error_cell(r: Row) -> Cell:
    return "error", str(r.get("error", "?")).splitlines()[0][:200].replace("|", "/")


def _profile_row(profile: str, compiled: bool = False) -> Callable[[Row], bool]:
    return lambda r: r["stage"] == "profile" and str(r.get("profile")) == profile and bool(r.get("compile")) == compiled


def _backend_row(backend: str) -> Callable[[Row], bool]:
    return lambda r: r["stage"] == "attention" and r.get("backend") == backend


STEP = "6B bf16 transformer step, 1024x1024, 512-token caption, CFG batch 2"
# (key, shell stage, one label per cell, how to find its result row, how to show it)
SPECS: list[tuple[str, str, list[str], Callable[[Row], bool], Callable[[Row], list[Cell]]]] = [
    ("a", "transformer", [f"{STEP}: ours", f"{STEP}: diffusers' ZImageTransformer2DModel, same tensors",
                          "ours / diffusers"], lambda r: r["stage"] == "transformer", transformer_cells),
    ("b", "build", ["random full-size int8 files (transformer, Qwen3-4B), VAE"], lambda r: r["stage"] == "build",
     lambda r: [(f"{r['build_s']:.0f} s", f"random weights drawn and quantized on {r.get('built_on', '?')}")]),
    ("b", "profile4", ["peak VRAM, profile 4 + int8, 1024x1024 (capped at 8 GiB)"],
     _profile_row("4"), lambda r: [vram_cell(r)]),
    ("b", "profile4", ["profile 4, int8, cap 8 GiB"], _profile_row("4"),
     lambda r: [profile_cell(r)]),
    ("b", "profile5", ["profile 5, int8, cap 8 GiB"], _profile_row("5"),
     lambda r: [profile_cell(r)]),
    ("b", "profile1", ["profile 1, int8, no cap (all in VRAM)"],
     _profile_row("1"), lambda r: [profile_cell(r)]),
    ("c", "lora", ["rank-32 random LoRA on every attention/FFN Linear (host/lora, runtime hooks), bf16: with vs without"],
     lambda r: r["stage"] == "lora", lambda r: [lora_cell(r)]),
    ("d", "compile", ["torch.compile of the transformer blocks: compiled vs eager"], lambda r: r["stage"] == "compile",
     lambda r: [compile_cell(r)]),
    ("d", "profile4_compile", ["--compile through the product: profile 4, int8, cap 8 GiB, second generation"],
     _profile_row("4", compiled=True), lambda r: [product_compile_cell(r)]),
    *[("e", "attention", [f"attention backend {name}"],
       _backend_row(name), lambda r: [attention_cell(r)])
      for name in ("sdpa", "flash", "sage", "sage2")],
    ("f", "vae", ["Flux VAE decode, 1024x1024 bf16: the host's lean walk vs diffusers' Decoder.forward"],
     lambda r: r["stage"] == "vae", lambda r: [vae_cell(r)]),
]


def table_rows(results: list[Row], stages: list[Row], out: Path) -> list[tuple[str, str, str, str]]:
    """(key, what, value, detail) for every expected row, measured or not."""
    by_stage = {s["stage"]: s for s in stages}
    rows = []
    packages = by_stage.get("packages")
    if packages is not None:
        log = out / "logs" / "packages.log"
        note = last_line(log) if log.is_file() and log.read_text().strip() else "installed at the pinned versions"
        if packages.get("skipped"):
            rows.append(("-", "packages of requirements.txt", "-", f"skipped: {packages['skipped']}"))
        else:
            rows.append(("-", "packages of requirements.txt", "ok" if packages.get("exit") == 0 else "MISSING", note))
    for key, stage, labels, match, show in SPECS:
        found = next((r for r in results if match(r)), None)
        if found is None:
            found = next((r for r in results if r["stage"] == stage and r.get("ok") is False), None)
        if found is not None and found.get("ok") is False:
            cells = [error_cell(found)] * len(labels)
        elif found is not None:
            cells = show(found)
        else:
            cells = [("-", stage_status(by_stage.get(stage), out))] * len(labels)
        rows += [(key, what, value, detail) for what, (value, detail) in zip(labels, cells, strict=True)]
    tests = by_stage.get("pytest")
    if tests is not None:
        if tests.get("skipped"):
            rows.append(("-", "pytest -m gpu (tiny model on CUDA)", "-", f"skipped: {tests['skipped']}"))
        else:
            rows.append(("-", "pytest -m gpu (tiny model on CUDA)", f"exit {tests['exit']}", last_line(out / "logs" / "pytest.log")))
    return rows


def render(out: Path) -> str:
    """The markdown: one header line (machine, total time, dry run or not), then the table."""
    results, stages = read_jsonl(out / "results.jsonl"), read_jsonl(out / "stages.jsonl")
    machine = (out / "machine.txt").read_text(errors="replace").strip().replace("\n", "; ") if (out / "machine.txt").is_file() else ""
    total = sum(s.get("seconds", 0) for s in stages)
    dry = any(r.get("dry_run") or r.get("tiny") for r in results)
    head = f"GPU check ({'DRY RUN: tiny model on the CPU, figures mean nothing; ' if dry else ''}{machine}; stages took {total} s)"
    lines = [head, "", "| | what | result | detail |", "|---|---|---|---|"]
    lines += [f"| {k} | {what} | {value} | {detail} |" for k, what, value, detail in table_rows(results, stages, out)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["packages", "table"])
    parser.add_argument("--out", type=Path, help="the check's output folder (table)")
    parser.add_argument("--requirements", type=Path, default=ROOT / "requirements.txt")
    args = parser.parse_args(argv)
    if args.what == "packages":
        missing, optional, other = check_packages(args.requirements)
        if other or optional:
            print(f"note: {', '.join(other + [n + ' not installed (not needed here)' for n in optional])}", file=sys.stderr)
        if missing:
            print(f"missing Python packages on this machine: {' '.join(missing)} (install them: pip install -r requirements.txt)")
            return 2
        return 0
    text = render(args.out)
    (args.out / "table.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
