"""Command-line flags of batch jobs (`--batch FILE` and its options) and the command itself."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import UserInputError
from host.batch.inputs import parse_set_options
from host.batch.job import BatchOptions, run_batch
from host.session import Session

EXIT_OK, EXIT_FAILED = 0, 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `batch jobs` flag group."""
    group = parser.add_argument_group("batch jobs (resumable; see README 'Batch jobs')")
    group.add_argument("--batch", type=Path, metavar="FILE", help="run every row of a .csv, .jsonl or .json file; "
                       "a re-run skips what its manifest records as done")
    group.add_argument("--set", dest="batch_set", action="append", default=[], metavar="KEY=VALUE",
                       help="a setting for every row that does not give it (repeatable), e.g. --set num_inference_steps=8")
    group.add_argument("--template", metavar="TEXT", help='prompt from the row\'s columns, e.g. "studio photo of {product}, {style}"')
    group.add_argument("--manifest", type=Path, metavar="FILE", help="the batch record (default: <output dir>/<stem>.manifest.jsonl)")
    group.add_argument("--retry-failed", action="store_true", help="run again the tasks the manifest records as failed")
    group.add_argument("--ray", metavar="ADDRESS", help="run on Ray: auto (the running cluster), local (this machine), "
                       "host:port or ray://host:port; needs requirements-ray.txt")
    group.add_argument("--workers", type=_positive, metavar="N", help="Ray workers (default: one per GPU; 1 on a CPU-only cluster)")


def batch_command(session: Session, args: argparse.Namespace, flag_settings: Mapping[str, Any]) -> int:
    """`--batch FILE`: the one-shot setting flags given (and `--model`) and `--set` are defaults for every row."""
    try:
        if args.workers is not None and not args.ray:
            raise UserInputError("--workers counts Ray workers: give --ray too (e.g. --ray local --workers 2)")
        given = parse_set_options(args.batch_set)
        defaults = {**({"model_type": args.model} if args.model else {}), **flag_settings, **given}
        options = BatchOptions(defaults, frozenset(given), args.template, args.manifest, args.retry_failed, args.ray, args.workers)
        counts = run_batch(session, args.batch, options, args.output_dir)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if counts.ok else EXIT_FAILED


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value
