"""Command line: web UI (default), `--process`, one-shot `--prompt`, `--selftest`, `--list-models`.

Exit codes: 0 when every task succeeded, 1 when any failed (the others still ran and were saved),
130 on Ctrl-C. This module's own output goes to the terminal with print; everything else logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import GenerationCancelled, UserInputError
from host import PROGRAM_NAME, __version__, settings_cli
from host.batch import cli as batch_cli
from host.lora import cli as lora_cli
from host.lowvram import cli as lowvram_cli
from host.progress import ProgressBar, timing_line
from host.session import Destination, HostConfig, Phase, Session
from host.tasks import PreparedTask, RawTask, override_tasks, prepare_tasks, read_task_files

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def build_parser(session: Session | None = None) -> argparse.ArgumentParser:
    """All flags. The settings' one-shot flags come from the schemas: the host's always, the families'
    (`--steps`, `--guidance`, ...) once the session has discovered them; each family adds `--lora-dir-<family>`."""
    p = argparse.ArgumentParser(
        prog="wgp.py", description=f"{PROGRAM_NAME} {__version__}: local image generation", add_help=session is not None
    )
    act = p.add_argument_group("what to do (default: the web UI)")
    act.add_argument(
        "--process", nargs="+", type=Path, metavar="FILE",
        help="run task files: JSON (ours or Wan2GP's: settings, lists, queue manifests, settings/*_settings.json), "
        "Wan2GP .zip queues, images (ours, Wan2GP, ComfyUI, A1111); setting flags given override every task's; "
        "--batch for CSV/JSONL",
    )
    act.add_argument("--model", help="one-shot: model type (preset id), with --prompt; with --process: every task's model type")
    act.add_argument("--selftest", action="store_true", help="generate with the tiny self-test model (no download)")
    act.add_argument("--list-models", action="store_true", help="list the model types and exit")
    gen = p.add_argument_group("one-shot settings (override the preset)")
    gen.add_argument("--output", help="one-shot: exact output file (never overwritten), or a folder to save into")
    run = p.add_argument_group("files and running")
    run.add_argument("--output-dir", type=Path, help="where images go (default: outputs/)")
    settings_cli.add_setting_flags(run, settings_cli.host_flag_specs())  # --quantization, --profile, --attention, ...
    lowvram_cli.add_arguments(run)
    lora_cli.add_arguments(run)
    run.add_argument(
        "--checkpoints-dir",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="extra folder to find model files in (ComfyUI models, HF cache); repeatable",
    )
    run.add_argument("--ckpts", type=Path, help="main checkpoint folder, downloads go here (default: ckpts/)")
    run.add_argument("--offline", action="store_true", help="never download; report missing files")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    run.add_argument("-v", "--verbose", action="store_true")
    batch_cli.add_arguments(p)
    web = p.add_argument_group("web UI")
    web.add_argument("--server-port", type=int, default=7860)
    web.add_argument("--listen", action="store_true", help="serve on all interfaces (not only 127.0.0.1)")
    web.add_argument("--share", action="store_true", help="Gradio share link")
    web.add_argument("--settings-dir", type=Path, help="where 'save as my defaults' writes (default: settings/)")
    dev = p.add_argument_group("development (point the host at other folders)")
    dev.add_argument("--models-root", type=Path, help=argparse.SUPPRESS)
    dev.add_argument("--defaults-dir", type=Path, help=argparse.SUPPRESS)
    dev.add_argument("--finetunes-dir", type=Path, help=argparse.SUPPRESS)
    if session is not None:
        settings_cli.add_setting_flags(gen, settings_cli.family_flag_specs(session.registry))
        for family in session.registry.families.values():
            family.handler.register_lora_cli_args(p)
    return p


def config_from_args(args: argparse.Namespace) -> HostConfig:
    """HostConfig from the parsed flags (defaults where a flag is absent)."""
    return HostConfig.from_args(args)


def session_from_args(argv: Sequence[str]) -> tuple[Session, argparse.Namespace]:
    """Parse twice: first to find the folders, then with the families' own flags added."""
    first, _ = build_parser().parse_known_args(argv)
    session = Session(config_from_args(first))
    args = build_parser(session).parse_args(argv)
    session.config = config_from_args(args)
    return session, args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python wgp.py`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        session, args = session_from_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return _dispatch(session, args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(session: Session, args: argparse.Namespace) -> int:
    for message in session.catalog.errors:
        print(f"warning: preset skipped: {message}", file=sys.stderr)
    if args.list_models:
        return list_models(session)
    if args.plan:
        return lowvram_cli.plan_command(session, args)
    if args.merge_loras:
        return lora_cli.merge_command(session, args)
    if args.save_quantized:
        return lowvram_cli.save_quantized_command(session, args)
    if args.selftest:
        presets = [p for p in session.catalog.presets.values() if p.model_def.get("selftest")]
        if not presets:
            print('error: no self-test preset found (a preset with "selftest": true)', file=sys.stderr)
            return EXIT_FAILED
        raw = [RawTask({"model_type": p.model_type, **_one_shot_settings(session, args)}, f"selftest {p.model_type}") for p in presets]
        return run_tasks(session, raw, args.output_dir)
    if args.batch:
        return batch_cli.batch_command(session, args, _one_shot_settings(session, args))
    if args.process:
        tasks, unreadable = read_task_files(args.process)
        overrides = _one_shot_settings(session, args) | ({"model_type": args.model} if args.model else {})
        return run_tasks(session, override_tasks(tasks, overrides), args.output_dir, failed=unreadable)
    if args.model or getattr(args, "prompt", None) is not None:
        if not args.model:
            print("error: --prompt needs --model (see --list-models)", file=sys.stderr)
            return EXIT_FAILED
        output_dir, output_file = output_target(args.output, args.output_dir)
        raw = [RawTask({"model_type": args.model, **_one_shot_settings(session, args, output_file)}, "command line")]
        return run_tasks(session, raw, output_dir, output_file=output_file)
    return launch_web(args)


def output_target(text: str | None, output_dir: Path | None) -> tuple[Path | None, Path | None]:
    """`--output` -> (folder, file): an existing folder, or a path ending in '/', is a folder to save into."""
    if text is None:
        return output_dir, None
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        return path, None
    return output_dir, path


def _one_shot_settings(session: Session, args: argparse.Namespace, output_file: Path | None = None) -> dict[str, Any]:
    """The settings given as flags (host's and families'), by setting name."""
    specs = [*settings_cli.host_flag_specs(), *settings_cli.family_flag_specs(session.registry)]
    settings = settings_cli.settings_from_args(args, specs)
    if output_file is not None and "output_format" not in settings:
        suffix = output_file.suffix.lower().lstrip(".")
        settings["output_format"] = {"jpg": "jpeg"}.get(suffix, suffix) if suffix else "png"
    return settings


def list_models(session: Session) -> int:
    """Model types grouped by family (order, label), hidden presets left out."""
    registry = session.registry
    for family in sorted(registry.families.values(), key=lambda f: (f.order, f.label)):
        print(f"{family.label}:")
        for preset in sorted(session.catalog.presets.values(), key=lambda p: p.model_type):
            if preset.visible and registry.family_of.get(preset.architecture) == family.name:
                print(f"  {preset.model_type:<24} {preset.name}")
    return EXIT_OK


def run_tasks(
    session: Session,
    raw: list[RawTask],
    output_dir: Path | None,
    output_file: Path | None = None,
    failed: list[PreparedTask] | None = None,
) -> int:
    """Validate all tasks, then run the valid ones in order; failures are reported, not fatal.

    The destination is checked first: a folder that cannot take the images stops the run before any work.
    """
    try:
        session.check_destination(output_dir, output_file)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    failures = list(failed or [])
    for item in failures:
        _report_failure(item.where, str(item.error))
    prepared = prepare_tasks(session, raw)
    for item in prepared:
        if item.error is not None:
            _report_failure(item.where, item.error)
            failures.append(item)
        for note in item.task.notes if item.task is not None else []:  # another tool's file, run as it meant
            print(f"note: {item.where}: {note}")
    valid = [p for p in prepared if p.task is not None]
    for number, item in enumerate(valid, 1):
        if not _run_one(session, item, f"[{number}/{len(valid)}]", output_dir, output_file):
            failures.append(item)
    total = len(prepared) + len(failed or [])
    print(
        f"{total - len(failures)} of {total} task(s) succeeded"
        + ("" if not failures else "; failed: " + ", ".join(f.where for f in failures))
    )
    return EXIT_FAILED if failures else EXIT_OK


def _run_one(session: Session, item: PreparedTask, label: str, output_dir: Path | None, output_file: Path | None) -> bool:
    """One task: progress bar, timing line, saved paths. Returns False (after reporting) on failure."""
    task = item.task
    assert task is not None
    print(f"{label} {task.model_type}: {str(task.settings.get('prompt', ''))[:70]!r}")
    bar = ProgressBar(f"{label} {task.model_type}")
    try:
        result = session.run(task, on_step=bar, on_phase=_print_lora_reports, save_to=Destination(output_dir, output_file))
        paths = result.paths
    except (UserInputError, GenerationCancelled) as exc:
        bar.close()
        item.error = str(exc)
        _report_failure(item.where, item.error)
        return False
    except Exception as exc:  # noqa: BLE001 - out of memory, a disk error, a bug: this task fails, the others run
        bar.close()
        log.debug("task %s failed", item.where, exc_info=True)
        item.error = f"{type(exc).__name__}: {exc}"
        _report_failure(item.where, item.error + " (run with -v for the traceback)")
        return False
    print(
        f"{label} seed {result.settings['seed']} | "
        + timing_line(
            result.info["timings"], result.peak_gb, result.peak_what, result.load_s, result.info.get("step_cache")
        )
    )
    for path in paths:
        print(f"saved {path}")
    return True


def _print_lora_reports(phase: Phase) -> None:
    """Once the model is loaded: one line per LoRA on it, before the progress bar (dialect, modules matched,
    rank, multiplier)."""
    if phase.name == "loaded":
        for report in phase.detail["lora_reports"]:
            print(f"  {report.summary()}")


def _report_failure(where: str, message: str) -> None:
    """`FAILED <where>: <message>` on stderr (messages that already start with `where` are not prefixed twice)."""
    print(f"FAILED {message}" if message.startswith(where) else f"FAILED {where}: {message}", file=sys.stderr)


def launch_web(args: argparse.Namespace) -> int:
    """The web UI (host/web/__init__.py), imported only when asked for."""
    from host import web

    return int(web.launch(args) or EXIT_OK)
