"""LoRA flags of the command line: `--loras DIR` (root folder) and the merge tool
`--merge-loras A.safetensors:0.7 B.safetensors:0.5 --output merged.safetensors [--rank R] [--model TYPE]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.errors import SettingsError
from host.lora import lora_root, register_lora_root_arg
from host.lora.merge import merge_main

EXIT_OK, EXIT_FAILED = 0, 1


def add_arguments(group: argparse._ArgumentGroup) -> None:
    register_lora_root_arg(group)
    group.add_argument(
        "--merge-loras",
        nargs="+",
        metavar="FILE[:W]",
        help="merge LoRAs (weighted sum of deltas) into --output; names resolve in the LoRA folders",
    )
    group.add_argument("--rank", type=int, help="with --merge-loras: rank of the merged LoRA (default: sum of ranks)")


def _normalizer_and_folders(session: Any, args: argparse.Namespace) -> tuple[Any, list[Path]]:
    """The family of --model (default: the first family that can read LoRAs) and its LoRA folders."""
    registry = session.registry
    if args.model:
        preset = session.catalog.get(args.model)
        handlers = [(preset.architecture, registry.handler_for(preset.architecture))]
    else:
        handlers = [(arch, registry.handlers[arch]) for arch in registry.architectures]
    for arch, handler in handlers:
        if hasattr(handler, "normalize_lora"):
            return handler, [handler.get_lora_dir(arch, args), lora_root(args)]
    raise SettingsError("no model family can read LoRAs (pass --model to choose one)")


def merge_command(session: Any, args: argparse.Namespace) -> int:
    """`--merge-loras ... --output FILE`: prints one summary line; errors go to stderr."""
    if args.output is None:
        print("error: --merge-loras needs --output merged.safetensors", file=sys.stderr)
        return EXIT_FAILED
    normalizer, folders = _normalizer_and_folders(session, args)
    result = merge_main(args.merge_loras, Path(args.output), normalizer, folders, rank=args.rank)
    print(result.summary())
    return EXIT_OK
