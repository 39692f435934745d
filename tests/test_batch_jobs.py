"""Batch jobs end to end: a 40-task CSV on the self-test model, in this process and on a local Ray cluster
(2 CPU workers). Every image exactly once and identical (pixels) to the single-process run and to the task
run alone; re-runs skip what is done; a SIGKILL of the driver or of a Ray worker loses nothing. The toy
family covers the manifest's edge cases (a kill between file and record, a torn line, --retry-failed, the lock).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from PIL import Image

from common.errors import SettingsError
from host import cli
from host.batch.job import BatchOptions, run_batch
from host.batch.manifest import Manifest
from host.registry import REPO_ROOT
from host.session import HostConfig, Session
from tests.fixtures.host_env import cli_args, toy_env

TEMPLATE = "studio photo of {product}, {style}"
PRODUCTS = ("red mug", "oak chair", "brass lamp", "wool scarf", "glass vase",
            "steel watch", "linen shirt", "clay pot", "silk tie", "cork board")
STYLES = ("soft light", "watercolor", "high key", "dark moody")
ROWS = 40


def _write_rows(path: Path) -> Path:
    """40 rows: a template from two columns, explicit seeds on even rows, derived seeds on odd ones."""
    lines = ["product,style,seed,num_inference_steps"]
    for i in range(ROWS):
        seed = str(1000 + i) if i % 2 == 0 else ""
        lines.append(f"{PRODUCTS[i % len(PRODUCTS)]},{STYLES[i // len(PRODUCTS)]},{seed},2")
    path.write_text("\n".join(lines) + "\n")
    return path


def _batch_flags(source: Path, ckpts: Path, out: Path) -> list[str]:
    return ["--batch", str(source), "--model", "z_image_selftest", "--template", TEMPLATE,
            "--ckpts", str(ckpts), "--output-dir", str(out), "--offline", "--device", "cpu"]


def _options(**kwargs: Any) -> BatchOptions:
    return BatchOptions(defaults={"model_type": "z_image_selftest"}, template=TEMPLATE, **kwargs)


def _session(ckpts: Path, out: Path) -> Session:
    return Session(HostConfig(ckpts=ckpts, output_dir=out, allow_download=False, device="cpu"))


def _records(manifest: Path) -> list[dict[str, Any]]:
    """Complete lines only (a driver may be appending while a test reads)."""
    if not manifest.exists():
        return []
    text = manifest.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def _pixels(folder: Path) -> dict[str, bytes]:
    """File name -> decoded pixel data (metadata, which holds timings, left out)."""
    return {p.name: Image.open(p).tobytes() for p in sorted(folder.glob("*.png"))}


def _assert_exactly_once(out: Path, reference: dict[str, bytes]) -> list[dict[str, Any]]:
    """40 images, the reference's names and pixels, one `done` record per task, hashes right, no temp files."""
    assert _pixels(out) == reference
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    records = _records(out / "rows.manifest.jsonl")
    done = [r for r in records if r["status"] == "done"]
    assert len({r["id"] for r in done}) == len(done) == ROWS  # each task recorded done once
    for record in done:
        [entry] = record["files"]
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    return records


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_rows(tmp_path_factory.mktemp("batch") / "rows.csv")


@pytest.fixture(scope="module")
def reference(ckpts: Path, source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """The whole batch run once in this process (embedded default): the folder and its pixels."""
    out = tmp_path_factory.mktemp("reference")
    counts = run_batch(_session(ckpts, out), source, _options(), out, out=io.StringIO(), err=io.StringIO())
    assert (counts.done, counts.failed, counts.images) == (ROWS, 0, ROWS)
    return out, _pixels(out)


# -- embedded (one process) ----------------------------------------------------------------------


def test_embedded_images_equal_tasks_run_alone_and_a_rerun_skips_all(reference, ckpts: Path, source: Path, tmp_path: Path) -> None:
    out, pixels = reference
    records = {r["row"]: r for r in _records(out / "rows.manifest.jsonl")}
    for row in (2, 3, 41):  # explicit seed, derived seed, last row
        record = records[row]
        i = row - 2
        prompt = TEMPLATE.format(product=PRODUCTS[i % len(PRODUCTS)], style=STYLES[i // len(PRODUCTS)])
        alone = tmp_path / f"alone_{row}.png"
        flags = ["--model", "z_image_selftest", "--prompt", prompt, "--seed", str(record["seed"]), "--steps", "2", "--output", str(alone)]
        assert cli.main([*flags, "--ckpts", str(ckpts), "--offline", "--device", "cpu"]) == 0
        assert Image.open(alone).tobytes() == pixels[record["files"][0]["path"]]
    lines = (out / "rows.manifest.jsonl").read_text()
    err = io.StringIO()
    counts = run_batch(_session(ckpts, out), source, _options(), out, out=io.StringIO(), err=err)
    assert (counts.skipped_done, counts.done, counts.images) == (ROWS, 0, 0)
    assert (out / "rows.manifest.jsonl").read_text() == lines and _pixels(out) == pixels


@pytest.mark.slow
def test_embedded_driver_sigkill_mid_batch_then_rerun_completes(reference, ckpts: Path, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _kill_driver_after(_batch_flags(source, ckpts, out), out / "rows.manifest.jsonl", records=8)
    assert 8 <= len(_records(out / "rows.manifest.jsonl")) < ROWS
    assert cli.main(_batch_flags(source, ckpts, out)) == 0
    records = _assert_exactly_once(out, reference[1])
    assert len(records) == ROWS  # nothing recorded twice (a file placed just before the kill is recovered once)


# -- Ray: a local cluster of 2 CPUs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    """Ray on this machine only: 2 CPUs, no dashboard, a small object store, every server on 127.0.0.1."""
    from host.batch.ray_runner import import_ray

    try:
        ray = import_ray(local=True)
    except SettingsError as exc:
        pytest.skip(str(exc))
    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_two_workers_one_killed_mid_run_then_rerun_skips_all(ray_cluster, reference, ckpts: Path, source: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_a_worker_after, args=(out / "rows.manifest.jsonl", 6, killed), daemon=True)
    watcher.start()
    counts = run_batch(_session(ckpts, out), source, _options(ray="auto", workers=2), out, out=io.StringIO(), err=io.StringIO())
    watcher.join(timeout=5)
    assert killed and _gone(killed[0])
    assert (counts.done, counts.failed) == (ROWS, 0)
    records = _assert_exactly_once(out, reference[1])
    workers = [int(r["worker"].rsplit(":", 1)[1]) for r in records]
    assert killed[0] in workers and len(set(workers)) >= 3  # the killed actor, its restart, the other one
    assert os.getpid() not in workers  # the images were made by the actors, not the driver
    counts = run_batch(_session(ckpts, out), source, _options(ray="auto", workers=2), out, out=io.StringIO(), err=io.StringIO())
    assert (counts.skipped_done, counts.done) == (ROWS, 0) and len(_records(out / "rows.manifest.jsonl")) == ROWS


@pytest.mark.slow
def test_ray_driver_sigkill_mid_batch_then_rerun_completes(ray_cluster, reference, ckpts: Path, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = [*_batch_flags(source, ckpts, out), "--ray", ray_cluster, "--workers", "2"]
    _kill_driver_after(flags, out / "rows.manifest.jsonl", records=8, env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert 8 <= len(_records(out / "rows.manifest.jsonl")) < ROWS
    counts = run_batch(_session(ckpts, out), source, _options(ray="auto", workers=2), out, out=io.StringIO(), err=io.StringIO())
    assert counts.failed == 0 and counts.done + counts.recovered + counts.skipped_done == ROWS
    _assert_exactly_once(out, reference[1])


def _kill_driver_after(flags: list[str], manifest: Path, records: int, env: dict[str, str] | None = None) -> None:
    """Run `wgp.py` with `flags` in a child process and SIGKILL it once the manifest holds `records` records."""
    child = subprocess.Popen([sys.executable, str(REPO_ROOT / "wgp.py"), *flags], cwd=REPO_ROOT, env={**os.environ, **(env or {})},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while len(_records(manifest)) < records:
            assert child.poll() is None, f"the batch ended before it was killed: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_a_worker_after(manifest: Path, records: int, killed: list[int]) -> None:
    """SIGKILL the Ray actor process that recorded the latest task once `records` tasks are recorded."""
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        found = _records(manifest)
        if len(found) >= records:
            pid = int(found[-1]["worker"].rsplit(":", 1)[1])
            assert pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.02)


# -- the manifest's edge cases, with the toy family ------------------------------------------------


@pytest.fixture
def toy(tmp_path: Path) -> tuple[HostConfig, Path]:
    config = toy_env(tmp_path)
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"model_type": "toy", "seed": i, "prompt": f"toy {i}"}) + "\n" for i in range(5)))
    return config, source


def _toy_run(config: HostConfig, source: Path, **options: Any) -> Any:
    return run_batch(Session(config), source, BatchOptions(**options), out=io.StringIO(), err=io.StringIO())


def test_a_kill_between_file_and_record_keeps_the_file_and_records_it_once(toy) -> None:
    config, source = toy
    _toy_run(config, source)
    manifest = config.output_dir / "rows.manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-1]))  # the last task's file is there, its record never written
    last = json.loads(lines[-1])
    path = config.output_dir / last["files"][0]["path"]
    before = path.stat()
    counts = _toy_run(config, source)
    assert (counts.recovered, counts.skipped_done, counts.done) == (1, 4, 0)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not written again
    [recovered] = _records(manifest)[-1:]
    assert recovered["id"] == last["id"] and recovered["recovered"] is True
    assert recovered["files"][0]["sha256"] == last["files"][0]["sha256"]
    assert len(list(config.output_dir.glob("*.png"))) == 5


def test_a_torn_last_line_is_cut_and_its_task_runs_again(toy) -> None:
    config, source = toy
    _toy_run(config, source)
    manifest = config.output_dir / "rows.manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])
    (config.output_dir / torn["files"][0]["path"]).unlink()
    manifest.write_text("".join(lines[:-1]) + lines[-1][:25])  # power cut in the middle of the last line
    counts = _toy_run(config, source)
    assert (counts.done, counts.skipped_done) == (1, 4)
    records = _records(manifest)
    assert len(records) == 5 and records[-1]["id"] == torn["id"] and manifest.read_text().endswith("}\n")


def test_failed_tasks_are_skipped_until_retry_failed(toy) -> None:
    config, source = toy
    vae = config.ckpts / "toy" / "toy_vae.safetensors"
    data = vae.read_bytes()
    vae.unlink()  # every task fails at its files (validation does not need them)
    counts = _toy_run(config, source)
    assert (counts.failed, counts.done) == (5, 0)
    manifest = config.output_dir / "rows.manifest.jsonl"
    assert all(r["status"] == "failed" and "toy_vae.safetensors" in r["error"] for r in _records(manifest))
    vae.write_bytes(data)
    counts = _toy_run(config, source)
    assert (counts.skipped_failed, counts.done, counts.ok) == (5, 0, False) and len(_records(manifest)) == 5
    counts = _toy_run(config, source, retry_failed=True)
    assert (counts.done, counts.failed, counts.ok) == (5, 0, True)
    assert len(list(config.output_dir.glob("*.png"))) == 5


def test_one_run_at_a_time_holds_the_manifest(tmp_path: Path) -> None:
    with Manifest(tmp_path / "m.jsonl"):
        with pytest.raises(SettingsError, match="another run of this batch is using this manifest"):
            Manifest(tmp_path / "m.jsonl")
    Manifest(tmp_path / "m.jsonl").close()  # released with the first


def test_cli_rerun_reports_skipped_and_exit_code(toy, capsys: pytest.CaptureFixture[str]) -> None:
    config, source = toy
    assert cli.main(["--batch", str(source), *cli_args(config)]) == 0
    assert cli.main(["--batch", str(source), *cli_args(config)]) == 0
    assert "5 skipped (done earlier)" in capsys.readouterr().out
