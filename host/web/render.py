"""HTML pieces of the web UI (status line, progress bar, queue table) and its CSS; plain strings, no Gradio."""

from __future__ import annotations

import html
from pathlib import Path

from host.web.queue import FILES, Job, Snapshot

CSS = """
#status .wgp-msg { padding: 8px 12px; border-radius: 6px; white-space: pre-wrap; font-size: 0.95em; }
#status .wgp-info { background: var(--background-fill-secondary); }
#status .wgp-success { background: #e7f6ea; color: #14532d; }
#status .wgp-error { background: #fdecea; color: #7f1d1d; border: 1px solid #f5c2c0; }
#progress .wgp-bar { height: 18px; background: var(--background-fill-secondary); border-radius: 9px; overflow: hidden; }
#progress .wgp-fill { height: 100%; background: var(--color-accent); transition: width 0.3s; }
#progress .wgp-text { font-size: 0.9em; margin-top: 4px; }
#queue table { width: 100%; font-size: 0.85em; border-collapse: collapse; }
#queue td, #queue th { padding: 2px 6px; text-align: left; border-bottom: 1px solid var(--border-color-primary); }
.wgp-inactive textarea { opacity: 0.5; border-style: dashed !important; }
#token_count, #size_note { font-size: 0.85em; }
"""


def status_html(text: str, level: str = "info") -> str:
    """One message box; `level` is info, success or error (errors are red, never a spinner)."""
    level = level if level in ("info", "success", "error") else "info"
    return f'<div class="wgp-msg wgp-{level}" data-level="{level}">{html.escape(text)}</div>'


def progress_html(snapshot: Snapshot, download_bytes: int = 0, owner: str | None = None) -> str:
    """The bar of the running job: step, s/it, ETA; before the steps, the phase (files, loading).

    With `owner` (the page asking), another page's running job is named as such, without its bar.
    """
    job = snapshot.current
    if job is None:
        waiting = len(snapshot.pending)
        text = f"{waiting} job(s) waiting" if waiting else "idle"
        return _bar(0, text, 0, 0)
    if owner is not None and job.owner != owner:
        mine = sum(1 for j in snapshot.pending if j.owner == owner)
        text = f"busy with job #{job.id} from another tab" + (f"; {mine} of your job(s) waiting" if mine else "")
        return _bar(0, text, 0, 0)
    phase = job.progress_text()
    if job.state == FILES and download_bytes:
        phase += f" — {download_bytes / 1e9:.2f} GB downloaded so far (progress bars in the terminal)"
    percent = 100.0 * job.step / job.total if job.total else 0.0
    return _bar(percent, f"job #{job.id}: {phase}", job.step, job.total)


def _bar(percent: float, text: str, step: int, total: int) -> str:
    return (
        f'<div class="wgp-progress" data-step="{step}" data-total="{total}">'
        f'<div class="wgp-bar"><div class="wgp-fill" style="width:{percent:.1f}%"></div></div>'
        f'<div class="wgp-text">{html.escape(text)}</div></div>'
    )


def queue_html(snapshot: Snapshot, owner: str | None = None) -> str:
    """Running and waiting jobs, then the last finished ones, each with its own settings (everyone's;
    with `owner`, the asking page's own jobs are marked "this tab")."""
    rows = []
    jobs: list[Job] = ([snapshot.current] if snapshot.current else []) + snapshot.pending
    jobs += list(reversed(snapshot.finished[-8:]))
    for job in jobs:
        s = job.task.settings
        state = job.state if job.state not in ("failed", "aborted") else f"{job.state}: {job.message}"
        rows.append(
            "<tr>"
            f"<td>#{job.id}{_whose(job, owner)}</td><td>{html.escape(job.task.model_type)}</td>"
            f"<td>{html.escape(_short(str(s.get('prompt', ''))))}</td>"
            f"<td>{html.escape(str(s.get('resolution', '')))}</td><td>{s.get('num_inference_steps', '')}</td>"
            f"<td>{html.escape(_short(state, 80))}</td>"
            "</tr>"
        )
    if not rows:
        return "<p>Queue empty: press Generate (several times to queue several tasks).</p>"
    head = "<tr><th>job</th><th>model</th><th>prompt</th><th>size</th><th>steps</th><th>state</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _whose(job: Job, owner: str | None) -> str:
    if owner is None:
        return ""
    return " (this tab)" if job.owner == owner else " (other tab)"


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def download_bytes(ckpts: Path) -> int:
    """Bytes in partial downloads under the checkpoint folder (huggingface_hub's `.incomplete` files)."""
    if not ckpts.is_dir():
        return 0
    total = 0
    for path in ckpts.rglob("*.incomplete"):
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total
