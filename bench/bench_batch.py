"""Batch throughput: one process vs Ray workers on the self-test model, and the per-task overhead of the
manifest and of the Ray path.

    .venv/bin/python bench/bench_batch.py                                 # 16 tasks, 256x256, 4 steps, 2 Ray workers
    .venv/bin/python bench/bench_batch.py --tasks 32 --size 384x384 --workers 4 --repeats 3

1. The same CSV through `run_batch` in this process, then on a local Ray cluster (every CPU of this machine,
   `--workers` actors), alternated `--repeats` times: images/min over the whole run (model loads included,
   what the progress bar shows) and in steady state (between the first and the last task's record), the
   machine's load average before each run, and whether every image is identical.
   On a GPU machine `--device cuda` gives one actor per GPU, which is where Ray scales; on a CPU the one
   process already uses every core, so Ray workers share them.
2. Manifest overhead: `Committer.commit` of an already encoded image of the size step 1 made (file written,
   fsynced, hard-linked, hashed, record appended and fsynced) and `Manifest.append` alone, in ms per task.
3. Ray path overhead: the real dispatcher (`ray.wait`, chunks, results back to the driver) over actors that
   return ready outcomes of the same size, in ms per task.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host.batch.commit import Committer  # noqa: E402
from host.batch.execute import TaskOutcome, TaskSpec  # noqa: E402
from host.batch.job import BatchOptions, run_batch  # noqa: E402
from host.batch.manifest import Manifest  # noqa: E402
from host.session import HostConfig, Session  # noqa: E402


def write_rows(path: Path, tasks: int, size: str, steps: int) -> Path:
    lines = ["prompt,seed,resolution,num_inference_steps"]
    lines += [f"bench product {i} on a plain background,{100 + i},{size},{steps}" for i in range(tasks)]
    path.write_text("\n".join(lines) + "\n")
    return path


def records(manifest: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def throughput(session: Session, source: Path, out: Path, options: BatchOptions) -> dict[str, float]:
    """Run the batch; images/min over the run and in steady state (record times, first to last)."""
    start = time.perf_counter()
    counts = run_batch(session, source, options, out, out=io.StringIO(), err=io.StringIO())
    wall = time.perf_counter() - start
    assert counts.failed == 0 and counts.invalid == 0, "the bench batch must succeed"
    done = [datetime.fromisoformat(r["finished"]).timestamp() for r in records(out / f"{source.stem}.manifest.jsonl")]
    steady = (len(done) - 1) / (max(done) - min(done)) * 60 if len(done) > 1 and max(done) > min(done) else 0.0
    return {"wall_s": round(wall, 2), "images_per_min": round(counts.images / wall * 60, 2), "steady_images_per_min": round(steady, 2)}


def pixels(folder: Path) -> dict[str, bytes]:
    from PIL import Image

    return {p.name: Image.open(p).tobytes() for p in sorted(folder.glob("*.png"))}


def manifest_overhead(folder: Path, image: bytes, tasks: int) -> dict[str, float]:
    """ms per task of placing an encoded image and recording it, and of the record alone."""
    from host.batch.plan import BatchItem

    with Manifest(folder / "m.manifest.jsonl") as manifest:
        committer = Committer(manifest, folder)
        items = [BatchItem(TaskSpec(f"{i}-x", i, f"line {i}", {}), None, f"{i:05d}-bench", ".png", 1) for i in range(tasks)]  # type: ignore[arg-type]
        start = time.perf_counter()
        for item in items:
            committer.commit(item, TaskOutcome(item.spec.id, [image], 1, {}, None, "bench"))
        commit_ms = (time.perf_counter() - start) / tasks * 1000
        start = time.perf_counter()
        for i in range(tasks):
            manifest.append({"id": f"r{i}", "status": "done", "files": [{"path": "x.png", "sha256": "0" * 64}], "seed": 1})
        append_ms = (time.perf_counter() - start) / tasks * 1000
    return {"commit_ms_per_task": round(commit_ms, 2), "manifest_append_ms_per_task": round(append_ms, 2)}


class EchoWorker:
    """A Ray actor that returns ready outcomes: what is left is Ray's and the dispatcher's own cost."""

    def __init__(self, image: bytes):
        self.image = image

    def run_chunk(self, specs: list[TaskSpec]) -> list[TaskOutcome]:
        return [TaskOutcome(s.id, [self.image], 1, {}, None, "echo") for s in specs]


def ray_overhead(ray: Any, image: bytes, tasks: int, workers: int) -> dict[str, float]:
    """ms per task through the real dispatcher (`_dispatch`) with echo actors, chunks of CHUNK_SIZE."""
    from host.batch.plan import BatchItem
    from host.batch.ray_runner import CHUNK_SIZE, _chunks, _dispatch

    class _Task:  # what `_chunks` reads of a validated task
        model_type = "bench"

    actors = [ray.remote(EchoWorker).options(num_cpus=0).remote(image) for _ in range(workers)]
    ray.get([a.run_chunk.remote([]) for a in actors])  # started before the clock
    items = [BatchItem(TaskSpec(f"{i}-x", i, f"line {i}", {}), _Task(), "x", ".png", 1) for i in range(tasks)]  # type: ignore[arg-type]
    got: list[str] = []
    start = time.perf_counter()
    _dispatch(ray, actors, _chunks(items, CHUNK_SIZE), lambda item, outcome: got.append(outcome.id))
    per_task = (time.perf_counter() - start) / tasks * 1000
    assert len(got) == tasks
    for actor in actors:
        ray.kill(actor)
    return {"ray_ms_per_task": round(per_task, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--size", default="256x256", help="WxH of every image (compute grows with it)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, help="Ray actors (default: one per GPU with --device cuda, else 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overhead-tasks", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="alternated 1-process and Ray runs")
    parser.add_argument("--ckpts", type=Path, help="checkpoint folder (default: a temporary one; self-test files are written there)")
    args = parser.parse_args()
    if args.workers is None and not args.device.startswith("cuda"):
        args.workers = 2

    from host.batch.ray_runner import import_ray

    ray = import_ray(local=True)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        ckpts = args.ckpts or tmp_path / "ckpts"
        source = write_rows(tmp_path / "bench.csv", args.tasks, args.size, args.steps)
        config = HostConfig(ckpts=ckpts, allow_download=False, device=args.device)
        Session(config).files_for(Session(config).prepare({"model_type": "z_image_selftest"}))  # self-test files written before timing
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
        try:
            ray_run = (f"Ray, {args.workers or 'one per GPU'} workers", {"ray": "auto", "workers": args.workers})
            for repeat in range(args.repeats):  # alternated, so a change in the machine's other load hits both
                for name, extra in (("1 process", {}), ray_run):
                    load = os.getloadavg()[0]
                    out = tmp_path / f"{'ray' if extra else 'one'}{repeat}"
                    result = throughput(Session(config), source, out, BatchOptions(defaults={"model_type": "z_image_selftest"}, **extra))
                    runs.append({"run": name, "load_avg_1min": round(load, 2), **result, "folder": out.name})
            image = next((tmp_path / "one0").glob("*.png")).read_bytes()
            overhead = ray_overhead(ray, image, args.overhead_tasks, args.workers or 2)
        finally:
            ray.shutdown()
        reference = pixels(tmp_path / "one0")
        identical = all(pixels(tmp_path / r["folder"]) == reference for r in runs)
        commit = manifest_overhead(tmp_path / "commit", image, args.overhead_tasks)
    print(f"self-test model, {args.tasks} tasks of {args.size}, {args.steps} steps, {args.device}, {os.cpu_count()} CPUs, "
          f"image {len(image) / 1024:.1f} KiB")
    print("| run | load avg before | wall s | images/min (whole run) | images/min (steady) |\n|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['run']} | {r['load_avg_1min']} | {r['wall_s']} | {r['images_per_min']} | {r['steady_images_per_min']} |")
    print(f"identical images (pixels) in every run: {identical}")
    print(f"manifest: {commit['commit_ms_per_task']} ms/task to place a file and record it, "
          f"{commit['manifest_append_ms_per_task']} ms/task for the record alone")
    print(f"Ray path: {overhead['ray_ms_per_task']} ms/task (dispatch, transport, results back; echo actors)")
    print(json.dumps({"args": vars(args) | {"ckpts": str(args.ckpts)}, "runs": runs, "identical": identical, **commit, **overhead}))


if __name__ == "__main__":
    main()
