"""CLI actions of the low-VRAM work: `--plan` (memory planner) and `--save-quantized PATH`.

This module prints (it is CLI output); `host/cli.py` dispatches to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import SettingsError
from host.lowvram.planner import format_table, plan_table, sizes_from_facts
from host.session import Session

EXIT_OK, EXIT_FAILED = 0, 1


def add_arguments(run: argparse._ArgumentGroup) -> None:
    """--save-quantized, --plan, --vram-gb (--profile, --quantization and --attention are settings' flags)."""
    run.add_argument("--save-quantized", type=Path, metavar="PATH", help="with --model: write its transformer in int8")
    run.add_argument("--plan", action="store_true", help="with --model: print expected peak VRAM/RAM per profile")
    run.add_argument("--vram-gb", type=float, help="GPU memory for --plan (default: the detected GPU)")


def plan_command(session: Session, args: argparse.Namespace) -> int:
    """Print the planner's table for --model at --resolution (default: the preset's)."""
    if not args.model:
        print("error: --plan needs --model (see --list-models)", file=sys.stderr)
        return EXIT_FAILED
    preset = session.catalog.get(args.model)
    sizes = sizes_from_facts(preset.facts)
    if sizes is None:
        print(f"error: the {preset.architecture!r} family gives no sizes to plan with (query_model_facts)", file=sys.stderr)
        return EXIT_FAILED
    resolution = getattr(args, "resolution", None) or str(preset.settings.get("resolution", "1024x1024"))
    try:
        width, height = (int(v) for v in resolution.lower().split("x"))
    except ValueError:
        raise SettingsError(f"--resolution must be WxH, e.g. 1024x1024, got {resolution!r}") from None
    guidance = getattr(args, "guidance", None)
    cfg = float(preset.settings.get("guidance_scale", 0.0) if guidance is None else guidance) > 0
    vram = args.vram_gb if args.vram_gb is not None else _detected_vram_gb()
    title = f"{args.model} {width}x{height}, CFG {'on' if cfg else 'off'}, GPU {f'{vram:.1f} GB' if vram else 'none'}"
    print(format_table(plan_table(sizes, width, height, cfg, vram), title))
    print("estimates from component and activation sizes (see host/lowvram/planner.py); CUDA figures not yet measured")
    return EXIT_OK


def save_quantized_command(session: Session, args: argparse.Namespace) -> int:
    """Load --model with int8 weights (quantizing on the fly when no int8 file) and save its transformer."""
    from host.lowvram.quantize import save_quantized

    if not args.model:
        print("error: --save-quantized needs --model (see --list-models)", file=sys.stderr)
        return EXIT_FAILED
    session.config.device = session.config.device or "cpu"  # quantizing and writing need no GPU
    task = session.prepare({"model_type": args.model, "quantization": "int8"}, "--save-quantized")
    model, _ = session.model_for(task, session.files_for(task))
    path = save_quantized(model.transformer, args.save_quantized)
    print(f"saved {path} ({path.stat().st_size / 1e9:.2f} GB)")
    return EXIT_OK


def _detected_vram_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30
