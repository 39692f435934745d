"""The same batch on a Ray cluster (`--ray auto|local|ADDRESS|ray://...`).

Ray places the actors, carries the work and the results, restarts an actor whose process dies
(`max_restarts`) and re-sends the calls it had not finished (`max_task_retries`). One actor per GPU
(`num_gpus=1`), or on a CPU-only cluster `--workers N` actors sharing its CPUs; each holds a loaded
session. Tasks go out in small chunks, in the batch's order (grouped by model and LoRAs), a few per
actor so none waits; each result comes back to the driver, which writes the files and the manifest
(workers need no shared disk). A result that arrives twice (a call Ray retried after it had run) is
recorded once; an actor that is gone for good hands its chunks to the others.

Ray is optional (requirements-ray.txt) and imported only here, when `--ray` is given.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import ModuleType
from typing import Any

from common.errors import SettingsError
from host.batch.execute import TaskOutcome, TaskSpec, execute, worker_name
from host.batch.plan import BatchItem
from host.session import HostConfig, Session

log = logging.getLogger(__name__)

LOCAL = "local"  # start a Ray instance on this machine for this run only, reachable from 127.0.0.1 alone
INSTALL_HINT = "--ray needs Ray, an optional install: pip install -r requirements-ray.txt (ray 2.60.0, about 80 MB)"
MAX_RESTARTS = 3  # a worker process that dies is started again this many times
MAX_TASK_RETRIES = 3  # and the chunks it had been given are re-sent to it this many times
CHUNK_SIZE = 2  # tasks per call: small, so results stream back and a lost call costs little
IN_FLIGHT = 2  # calls queued per actor, so it starts the next chunk while the driver writes the last

Commit = Callable[[BatchItem, TaskOutcome], Any]


class BatchWorker:
    """A Ray actor's state: one session whose model stays loaded from chunk to chunk."""

    def __init__(self, config: HostConfig):
        if config.device == "cpu":
            at_least_two_threads()
        self.session = Session(config)
        self.name = worker_name()

    def run_chunk(self, specs: list[TaskSpec]) -> list[TaskOutcome]:
        """Run each task of a chunk; failures are outcomes, never exceptions."""
        return [execute(self.session, spec, worker=self.name) for spec in specs]


def at_least_two_threads() -> None:
    """Same pixels as a single process: with one thread PyTorch runs 1x1 convolutions with another kernel
    (THNN instead of oneDNN: `use_mkldnn` in aten/src/ATen/native/Convolution.cpp tests get_num_threads() > 1),
    which moved VAE-decoded pixels by one level here; 2, 3 and 4 threads gave identical images. Ray gives an
    actor of one CPU one thread (OMP_NUM_THREADS), so CPU workers keep at least two."""
    import torch

    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)


def import_ray(local: bool = False) -> ModuleType:
    """Ray, imported on first use; SettingsError with the install line when it is missing."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    if local:
        # Ray's "no cluster" mode (its default on macOS and Windows): the node's address is 127.0.0.1 and
        # every Ray server listens there only. Read when ray is first imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise SettingsError(INSTALL_HINT) from None
    return ray


@contextmanager
def connected(address: str) -> Iterator[ModuleType]:
    """Ray connected to `address` (auto, local, host:port, ray://...); one already initialised (a test, a
    notebook) is used as it is and left running."""
    ray = import_ray(address == LOCAL)
    started = not ray.is_initialized()
    if started:
        try:
            if address == LOCAL:
                ray.init(include_dashboard=False)
            else:
                ray.init(address=address)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise SettingsError(f"--ray {address}: cannot connect ({exc}); start a cluster with `ray start --head`, "
                                "or use --ray local for this machine alone") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def actor_plan(resources: dict[str, float], workers: int | None, device: str | None) -> tuple[int, dict[str, Any], str]:
    """How many actors, their Ray resources and their device: one per GPU (or `workers` of them), else
    `workers` (default 1) sharing the CPUs evenly. SettingsError when the cluster cannot hold them."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus and not (device or "").startswith("cpu"):
        count = workers or gpus
        if count > gpus:
            raise SettingsError(f"--workers {count}: the Ray cluster has {gpus} GPU(s), one per worker; use --workers {gpus} or fewer")
        return count, {"num_gpus": 1}, "cuda"  # Ray sets CUDA_VISIBLE_DEVICES: each actor's cuda is its own GPU
    count = workers or 1
    if count > max(cpus, 1):
        raise SettingsError(f"--workers {count}: the Ray cluster has {cpus} CPU(s), at least one per worker; use --workers {cpus} or fewer")
    return count, {"num_cpus": max(1, cpus // count)}, "cpu"


def run_on_ray(config: HostConfig, items: Sequence[BatchItem], commit: Commit, address: str, workers: int | None = None,
               chunk_size: int = CHUNK_SIZE) -> None:
    """Run `items` on Ray actors; each outcome goes to `commit` on this (the driver's) process."""
    if not items:
        return
    with connected(address) as ray:
        count, resources, device = actor_plan(ray.cluster_resources(), workers, config.device)
        actor_class = ray.remote(BatchWorker).options(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES, **resources)
        actors = [actor_class.remote(replace(config, device=device)) for _ in range(count)]
        log.info("Ray: %d worker(s), %s each", count, resources)
        try:
            _dispatch(ray, actors, _chunks(items, chunk_size), commit)
        finally:
            for actor in actors:
                ray.kill(actor)


def _chunks(items: Sequence[BatchItem], size: int) -> list[list[BatchItem]]:
    """Consecutive tasks of one model in each chunk (a chunk never spans two models)."""
    chunks: list[list[BatchItem]] = []
    for item in items:
        last = chunks[-1] if chunks else None
        if last is not None and len(last) < size and last[0].task.model_type == item.task.model_type:
            last.append(item)
        else:
            chunks.append([item])
    return chunks


def _dispatch(ray: ModuleType, actors: list[Any], chunks: list[list[BatchItem]], commit: Commit) -> None:
    """Keep IN_FLIGHT calls on every live actor until the chunks are done (ray.wait for whichever ends first)."""
    queue = deque(chunks)
    pending: dict[Any, tuple[int, list[BatchItem]]] = {}  # ObjectRef -> (actor index, chunk)
    load = dict.fromkeys(range(len(actors)), 0)  # live actors -> calls in flight

    def fill() -> None:
        while queue and load and min(load.values()) < IN_FLIGHT:
            index = min(load, key=load.__getitem__)
            chunk = queue.popleft()
            pending[actors[index].run_chunk.remote([item.spec for item in chunk])] = (index, chunk)
            load[index] += 1

    fill()
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        index, chunk = pending.pop(ref)
        if index in load:
            load[index] -= 1
        try:
            outcomes = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # restarting, or unreachable for a moment: send the chunk again
            queue.appendleft(chunk)
            fill()
            continue
        except ray.exceptions.RayActorError as exc:  # restarted MAX_RESTARTS times already: it is gone
            load.pop(index, None)
            log.warning("Ray worker %d is gone (%s); its tasks go to the others", index, str(exc).splitlines()[0])
            queue.appendleft(chunk)
            if not load:
                _fail(list(queue), commit, f"every Ray worker died (last: {str(exc).splitlines()[0]})")
                queue.clear()
            fill()
            continue
        except ray.exceptions.RayError as exc:  # the call failed without taking the actor down (e.g. a lost result)
            _fail([chunk], commit, f"Ray: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            outcomes = []
        for item, outcome in zip(chunk, outcomes, strict=False):
            commit(item, outcome)
        fill()


def _fail(chunks: list[list[BatchItem]], commit: Commit, error: str) -> None:
    for chunk in chunks:
        for item in chunk:
            commit(item, TaskOutcome(item.spec.id, error=f"{item.spec.where}: {error}"))
