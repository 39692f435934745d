"""A host session: discovery + presets + files + one loaded model, shared by the CLI, API and web UI.

Data flow of one task: raw settings -> `prepare` (merge over the preset, validate, find the LoRA files)
-> `files_for` (variant, locate, download) -> `model_for` (load once, cached; LoRAs attached or swapped
on the loaded weights) -> `run` (generate) -> `save`.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.attention import get_attention_backend, set_attention_backend
from common.errors import SettingsError, UserInputError
from common.model_facts import DENOISER
from host import PROGRAM_NAME, __version__, lowvram, wan2gp
from host import settings as host_settings
from host.cache.step_cache import OFF, StepCacheTransform, cache_level
from host.compile import CompileTransform
from host.device import DeviceChoice, attention_backend, choose_device, peak_memory_gb, reset_peak_memory
from host.files import DEFAULT_CKPTS, CheckpointFolders, download_file, resolve_files, specs_from_model_def
from host.hashes import HashCache
from host.lora import LoraReport, LoraTransform
from host.lora.task import LoraChoice, expand_lset, lora_folders, task_loras
from host.lowvram.offload import uses_mmgp
from host.outputs import check_output_folder, output_name, remove_stale_temp_files, save_image
from host.presets import DEFAULTS_DIR, FINETUNES_DIR, Preset, PresetCatalog, load_presets
from host.registry import DEFAULT_MODELS_ROOT, REPO_ROOT, FamilyHandler, LoadedModel, Registry, discover
from host.transforms import PhaseReporter, TransformStack

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = REPO_ROOT / "outputs"
HASH_CACHE_NAME = ".hash_cache.json"


@dataclass
class HostConfig:
    """Where things are; the CLI fills it from flags, tests point it at temporary folders."""

    models_root: Path = DEFAULT_MODELS_ROOT
    defaults_dir: Path = DEFAULTS_DIR
    finetunes_dir: Path | None = FINETUNES_DIR
    ckpts: Path = DEFAULT_CKPTS
    extra_ckpts: list[Path] = field(default_factory=list)
    output_dir: Path = DEFAULT_OUTPUT_DIR
    allow_download: bool = True
    device: str | None = None
    lora_args: argparse.Namespace | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HostConfig:
        """From the parsed command-line flags (host/cli.py); defaults where a flag is absent."""
        config = cls(extra_ckpts=list(args.checkpoints_dir), allow_download=not args.offline, device=args.device, lora_args=args)
        for flag in ("models_root", "defaults_dir", "finetunes_dir", "ckpts", "output_dir"):
            if getattr(args, flag) is not None:
                setattr(config, flag, getattr(args, flag))
        return config


@dataclass
class Task:
    """A validated task: which preset, and the complete settings (seed may still be -1)."""

    model_type: str
    preset: Preset
    settings: dict[str, Any]
    where: str
    loras: LoraChoice = field(default_factory=LoraChoice)  # the preset's, then the task's; files resolved
    notes: list[str] = field(default_factory=list)  # one line per change made to run another tool's file as meant
    ignored: dict[str, Any] = field(default_factory=dict)  # other tools' keys that change nothing (host/foreign.py)


@dataclass
class TaskResult:
    """Images of one task with the settings that made them (seed resolved) and their provenance."""

    task: Task
    images: list[Any]
    settings: dict[str, Any]
    info: dict[str, Any]
    load_s: float | None
    peak_gb: float
    peak_what: str
    paths: list[Path] = field(default_factory=list)
    lora_reports: list[dict[str, Any]] = field(default_factory=list)  # LoraReport.to_dict() of each LoRA applied


@dataclass
class _Loaded:
    key: tuple[Any, ...]  # what the weights depend on (not the LoRAs: they are swapped on the same weights)
    model: LoadedModel
    transforms: TransformStack  # low-VRAM transforms, then the LoRAs (host/transforms.py)
    loras: LoraChoice | None = field(default_factory=LoraChoice)  # attached now; None = unknown after a failure


@dataclass(frozen=True)
class Phase:
    """A stage of `Session.run`, reported to its `on_phase` callback as it starts (or, for `loaded` and
    `saved`, as it ends): files, load, loaded, encode, denoise, decode, save, saved. `detail` carries what
    the stage produced (`loaded`: load_s and lora_reports; `saved`: paths)."""

    name: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Destination:
    """Where `Session.run` saves: a folder, or an exact file (an existing folder as `file` means inside it)."""

    folder: Path | None = None
    file: Path | None = None


PhaseCallback = Callable[[Phase], None]


class Session:
    """Holds the registry, the presets and at most one loaded model (switching releases the old one)."""

    def __init__(self, config: HostConfig | None = None):
        self.config = config or HostConfig()
        self.folders = CheckpointFolders(self.config.ckpts, list(self.config.extra_ckpts))
        self.hashes = HashCache(self.config.ckpts / HASH_CACHE_NAME)
        self._registry: Registry | None = None
        self._catalog: PresetCatalog | None = None
        self._device: DeviceChoice | None = None
        self._loaded: _Loaded | None = None
        self._swept: set[Path] = set()  # folders already cleared of a killed run's temporary files

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = discover(self.config.models_root)
        return self._registry

    @property
    def catalog(self) -> PresetCatalog:
        if self._catalog is None:
            self._catalog = load_presets(self.registry, self.config.defaults_dir, self.config.finetunes_dir)
        return self._catalog

    @property
    def device(self) -> DeviceChoice:
        if self._device is None:
            self._device = choose_device(self.config.device)
        return self._device

    def handler(self, preset: Preset) -> FamilyHandler:
        return self.registry.handler_for(preset.architecture)

    # -- 1. settings ----------------------------------------------------------------------------

    def prepare(self, raw: Mapping[str, Any], where: str = "task", source: str | None = None) -> Task:
        """Merge a task over its preset's defaults and validate it (nothing is loaded).

        `source` names the tool whose file the task was read from ("Wan2GP"); a Wan2GP task is adapted
        where Wan2GP behaves differently (host/wan2gp.py), each change in `task.notes`.
        """
        if not isinstance(raw, Mapping):
            raise SettingsError(f"{where}: a task is a JSON object of settings, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if not isinstance(model_type, str):
            raise SettingsError(f"{where}: 'model_type' is required (one of: {', '.join(sorted(self.catalog.presets))})")
        preset = self.catalog.get(model_type)
        handler, arch = self.handler(preset), preset.architecture
        family = host_settings.family_defaults(handler, arch, preset.model_def)
        specs = host_settings.family_specs(handler, arch)
        raw, notes = wan2gp.adapt(raw, source, handler, arch, preset.model_def, specs)
        fallback = preset.settings.get("resolution", family.get("resolution"))
        raw = host_settings.size_keys_to_resolution(raw, family, fallback, where)  # diffusers' width/height
        merged = {**host_settings.host_defaults(), **family, **preset.settings, **raw}
        valid = host_settings.validate(handler, arch, preset.model_def, merged, where)
        try:  # a missing or refused LoRA, or a step cache level the model type lacks, fails the task before anything loads
            cache_level(preset.facts, valid.get("cache", OFF), model_type)
            valid = expand_lset(valid, self.lora_folders(preset))
            loras = self.lora_choice(preset, valid)
        except UserInputError as err:
            raise type(err)(f"{where}: {err}") from None
        if loras and not hasattr(handler, "normalize_lora"):
            raise SettingsError(f"{where}: the {arch} family cannot apply LoRAs (its handler has no normalize_lora)")
        ordered = {"model_type": model_type, **{k: valid[k] for k in family if k in valid}}
        ordered.update({k: v for k, v in valid.items() if k not in ordered})
        ignored = host_settings.ignored_settings(handler, arch, merged, where)
        return Task(model_type, preset, ordered, where, loras, notes, ignored)

    def lora_folders(self, preset: Preset) -> list[Path]:
        """Where this preset's LoRA names resolve: the family's folder, then the root `loras/`."""
        return lora_folders(self.handler(preset), preset.architecture, self.config.lora_args)

    def lora_choice(self, preset: Preset, settings: Mapping[str, Any]) -> LoraChoice:
        """The preset's `loras`, then the task's `activated_loras`, resolved, each with its own multipliers."""
        return task_loras(preset.model_def, settings, self.lora_folders(preset), preset.model_type)

    # -- 2. files -------------------------------------------------------------------------------

    def files_for(self, task: Task) -> dict[str, Path]:
        """Local paths of every file the model needs (downloaded when missing and allowed)."""
        preset, quantization = task.preset, task.settings["quantization"]
        handler = self.handler(preset)
        family_files = handler.query_model_files(preset.architecture, preset.model_def, quantization)
        specs = specs_from_model_def(preset.model_def, family_files)
        self._sweep(self.folders.primary)  # hash cache and downloads are written there
        if preset.model_def.get("selftest"):
            self._write_selftest_files(handler, preset)
        download = download_file if self.config.allow_download else None
        return resolve_files(specs, quantization, self.folders, download, task.model_type)

    def _write_selftest_files(self, handler: FamilyHandler, preset: Preset) -> None:
        """Self-test presets' tiny random weights are written by the family on first use."""
        writer = getattr(handler, "write_selftest_files", None)
        if writer is None:
            raise SettingsError(f"preset {preset.model_type} is a self-test preset, but its family cannot write test files")
        try:  # the family writes only inside the checkpoints folder and refuses a preset pointing elsewhere
            writer(preset.architecture, preset.model_def, self.folders.primary)
        except UserInputError as err:
            raise type(err)(f"{' + '.join(str(p) for p in preset.sources)}: {err}") from None

    # -- 3. model -------------------------------------------------------------------------------

    def model_for(self, task: Task, files: Mapping[str, Path]) -> tuple[LoadedModel, float | None]:
        """The loaded model for this task, with the task's LoRAs attached.

        Weights are cached (same preset, files and options reuse them); a task with other LoRAs or
        multipliers swaps them on the loaded weights. Returns the model and the seconds spent loading
        weights and LoRAs (None when nothing had to be done).
        """
        load_s = self._load_weights(task, files)
        lora_s = self._attach_loras(task)
        self._set_compile(task)
        return self._loaded.model, None if load_s is None and lora_s is None else (load_s or 0.0) + (lora_s or 0.0)

    def _load_weights(self, task: Task, files: Mapping[str, Path]) -> float | None:
        """Load the model unless the cached one fits; returns the seconds it took (None: cached)."""
        s = task.settings
        key = (
            task.model_type,
            tuple(sorted((k, str(v)) for k, v in files.items())),
            s["quantization"],
            str(s["profile"]),
            self.device.device,
            self._mmgp_compiles(task),  # under mmgp its profile() compiles: changing that reloads
        )
        if self._loaded is not None and self._loaded.key == key:
            return None
        self.release()
        start = time.perf_counter()
        options = {"device": self.device.device, "dtype": self.device.dtype, "quantization": s["quantization"], "profile": s["profile"]}
        options["compile"] = self._mmgp_compiles(task)
        options = lowvram.load_options(options)  # load on the CPU under mmgp, on-demand text encoder, int8 reader
        model = self.handler(task.preset).load_model(task.preset.architecture, task.preset.model_def, files, options)
        stack = lowvram.apply_lowvram(model, options, files, task.preset.facts)  # int8, cache, tiling, guard, offload
        self._loaded = _Loaded(key, model, stack)
        return time.perf_counter() - start

    def _attach_loras(self, task: Task) -> float | None:
        """Make the loaded model carry exactly the task's LoRAs (the new files are read before the old ones go)."""
        loaded = self._loaded
        assert loaded is not None, "weights are loaded first"
        if loaded.loras == task.loras:
            return None
        start = time.perf_counter()
        loaded.loras = None  # unknown until done: after a failure the next task attaches (or removes) again
        if task.loras:
            paths, multipliers = list(task.loras.paths), list(task.loras.multipliers)
            denoiser = task.preset.facts.with_role(DENOISER)
            target = denoiser.name if denoiser is not None else LoraTransform.target
            transform = LoraTransform(paths, multipliers, normalizer=self.handler(task.preset), target=target)
            transform.load(loaded.model)  # a bad file fails here, with the previous LoRAs still attached
            loaded.transforms.push(transform)
        else:
            loaded.transforms.pop(LoraTransform.name)
        loaded.loras = task.loras
        return time.perf_counter() - start

    def _mmgp_compiles(self, task: Task) -> bool:
        """True when mmgp offloads this task's model and `compile` is on: mmgp's profile() compiles the blocks
        then (host/lowvram/offload.py), keeping its block loading outside the compiled code."""
        return bool(task.settings.get("compile")) and uses_mmgp(self.device.device, task.settings["profile"])

    def _set_compile(self, task: Task) -> None:
        """The loaded model's repeated blocks compiled when the task asks for `compile`, eager otherwise (the
        compiled code stays with the model between tasks, and LoRAs swapped under it are followed)."""
        stack, compiling = self._loaded.transforms, bool(task.settings.get("compile"))
        if not compiling:
            stack.pop(CompileTransform.name)
        if compiling and stack.get(CompileTransform.name) is None:
            stack.push(CompileTransform(task.preset.facts, compile_blocks=not self._mmgp_compiles(task)))

    def lora_reports(self) -> list[LoraReport]:
        """Load reports of the LoRAs on the loaded model (empty when it has none or nothing is loaded)."""
        transform = self.transform(LoraTransform.name)
        return list(transform.reports) if transform is not None else []

    def transform(self, name: str) -> Any:
        """The transform called `name` on the loaded model (None when nothing is loaded or it is absent)."""
        return self._loaded.transforms.get(name) if self._loaded is not None else None

    def release(self) -> None:
        """Free the loaded model's memory (the next task loads again)."""
        if self._loaded is not None:
            self._loaded.transforms.clear()
            self._loaded.model.release()
            self._loaded = None

    # -- 4. generate and save -------------------------------------------------------------------

    def run(
        self,
        task: Task,
        on_step: Callable[[Any], None] | None = None,
        on_phase: PhaseCallback | None = None,
        save_to: Destination | None = None,
    ) -> TaskResult:
        """Everything one task needs, once: files, model (cached) and LoRAs, generation, and (with
        `save_to`) the saved files in `result.paths`. The used seed is in `result.settings`.

        `on_phase` hears each stage (see Phase); `on_step` each denoising step. Either may raise
        GenerationCancelled to stop the task.
        """
        phase = on_phase or (lambda _: None)
        settings = host_settings.resolve_seed(task.settings)
        phase(Phase("files"))
        files = self.files_for(task)
        phase(Phase("load"))
        model, load_s = self.model_for(task, files)
        reports = self.lora_reports()
        phase(Phase("loaded", {"load_s": load_s, "lora_reports": reports}))
        backend = attention_backend(settings["attention"], task.preset.model_def.get("attention"), self.device.capability)
        backend = set_attention_backend(backend)  # the one actually used (a missing backend falls back to sdpa)
        reset_peak_memory(self.device.device)
        specs = host_settings.family_specs(self.handler(task.preset), task.preset.architecture)
        family_part = host_settings.generation_inputs(specs, settings)  # image inputs read into PIL images
        self._loaded.transforms.push(PhaseReporter(lambda name: phase(Phase(name))))
        level = cache_level(task.preset.facts, settings.get("cache", OFF), task.model_type)
        cache = self._loaded.transforms.push(StepCacheTransform(level)) if level is not None else None
        try:
            output = model.generate(family_part, on_step)
        finally:
            self._loaded.transforms.pop(PhaseReporter.name)
            self._loaded.transforms.pop(StepCacheTransform.name)  # opt-in per task: never left behind
        peak_gb, peak_what = peak_memory_gb(self.device.device)
        backend = get_attention_backend()  # a kernel that failed during the run fell back to sdpa: record that
        info = self.provenance(task, settings, files, backend, output, reports)
        if cache is not None and cache.last_report is not None:  # which steps reused the cache, in the saved image
            info["step_cache"] = cache.last_report.to_dict()
        compiled = self.transform(CompileTransform.name)
        if compiled is not None and compiled.last_report is not None:  # compile seconds apart from the steps
            info["compile"] = compiled.last_report.to_dict()
            if compiled.last_report.compile_s is not None:
                info["timings"]["compile_s"] = round(compiled.last_report.compile_s, 4)
        result = TaskResult(task, list(output.images), settings, info, load_s, peak_gb, peak_what)
        result.lora_reports = [r.to_dict() for r in reports]
        if save_to is not None:
            phase(Phase("save"))
            result.paths = self.save(result, save_to.folder, save_to.file)
            phase(Phase("saved", {"paths": list(result.paths)}))
        return result

    def provenance(
        self,
        task: Task,
        settings: Mapping[str, Any],
        files: Mapping[str, Path],
        backend: str,
        output: Any,
        reports: list[LoraReport] | None = None,
    ) -> dict[str, Any]:
        """What is needed to reproduce an image: program, files with hashes, LoRAs, input images (file name
        and sha256), precision."""
        hashes = {role: {"name": path.name, "sha256": self.hashes.sha256(path)} for role, path in files.items()}
        specs = host_settings.family_specs(self.handler(task.preset), task.preset.architecture)
        inputs = host_settings.input_records(specs, settings)
        return {
            "program": f"{PROGRAM_NAME} {__version__}",
            "model_name": task.preset.name,
            "architecture": task.preset.architecture,
            "files": hashes,
            "model_hash": hashes.get("transformer", {}).get("sha256", ""),
            "loras": dict(zip(task.loras.names, task.loras.multipliers, strict=True)),
            "lora_reports": self._lora_provenance(task.loras, reports or []),
            "quantization": settings["quantization"],
            "attention": backend,
            "device": self.device.label,
            "prompt_tokens": getattr(output, "prompt_tokens", None),
            "truncated": getattr(output, "truncated", None),
            "timings": {k: round(v, 4) for k, v in getattr(output, "timings", {}).items()},
        } | ({"inputs": inputs} if inputs else {}) | _import_record(task)

    def _lora_provenance(self, loras: LoraChoice, reports: list[LoraReport]) -> list[dict[str, Any]]:
        """Per LoRA: name as written, file hash, multiplier, and what loaded (a compact load report)."""
        out = []
        for name, path, multiplier, report in zip(loras.names, loras.paths, loras.multipliers, reports, strict=True):
            out.append({
                "name": name,
                "sha256": self.hashes.sha256(path),
                "multiplier": multiplier,
                "dialect": report.dialect,
                "modules_matched": report.modules_matched,
                "rank": report.rank,
                "alpha": report.alpha,
                "alpha_source": report.alpha_source,
                "not_applied": len(report.not_applied),
            })
        return out

    def check_destination(self, output_dir: Path | None = None, output_file: Path | None = None) -> Path:
        """Before any work: the folder the images will go to exists (created) and takes files; a killed
        run's temporary files there are removed. Raises SettingsError naming the folder. Returns it."""
        if output_file is not None and not Path(output_file).is_dir():
            folder = Path(output_file).expanduser().parent
        else:
            folder = Path(output_file or output_dir or self.config.output_dir)
        folder = check_output_folder(folder)
        self._swept.add(folder)
        return folder

    def _sweep(self, folder: Path) -> None:
        """Remove a killed run's temporary files from `folder`, once per session."""
        if folder not in self._swept:
            self._swept.add(folder)
            remove_stale_temp_files(folder)

    def save(self, result: TaskResult, output_dir: Path | None = None, output_file: Path | None = None) -> list[Path]:
        """Save every image of a result (atomic, never overwriting); returns the paths.

        `output_file` is the exact file, or, when it is an existing folder, the folder to save into.
        """
        settings = result.settings
        fmt = settings["output_format"]
        if output_file is not None and output_file.is_dir():
            output_dir, output_file = output_file, None
        self._sweep(Path(output_file.parent if output_file is not None else output_dir or self.config.output_dir))
        for index, image in enumerate(result.images):
            info = {**result.info, "batch_index": index} if len(result.images) > 1 else result.info
            if output_file is not None:
                folder, name = output_file.parent, output_file.name
            else:
                folder = output_dir or self.config.output_dir
                name = output_name(settings["seed"], str(settings.get("prompt", "")), fmt)
            result.paths.append(save_image(image, folder, name, settings, info, fmt))
        return result.paths


def _import_record(task: Task) -> dict[str, Any]:
    """Other tools' keys the task carried (ignored) and the changes made to run it as meant, for the record."""
    return ({"ignored_settings": dict(task.ignored)} if task.ignored else {}) | ({"notes": list(task.notes)} if task.notes else {})
