"""Settings from a ComfyUI image: its `prompt` (API graph) or `workflow` (UI graph) PNG text chunk.

ComfyUI's SaveImage writes `prompt` = {node id: {"class_type", "inputs"}} (links are [node id, output
slot]) and `workflow` = {"nodes": [{"id", "type", "inputs": [{"name", "link"}], "widgets_values"}],
"links": [[id, from node, from slot, to node, to slot, type]]}. The Z-Image graph is read from its sampler:

  KSampler: seed, steps, cfg, sampler, scheduler, denoise
    .positive / .negative -> CLIPTextEncode.text (ConditioningZeroOut = no negative prompt)
    .model -> ModelSamplingAuraFlow.shift -> LoraLoaderModelOnly / LoraLoader (name, strength) -> UNETLoader
    .latent_image -> EmptySD3LatentImage (width, height, batch_size)

ComfyUI's CFG is uncond + cfg * (cond - uncond), ours pos + g * (pos - neg): g = cfg - 1 (cfg 1 = off).
What is not carried over (its sampler and scheduler, an image-to-image start, unknown model patches) is
said in the notes; the model type is not guessed from the checkpoint's file name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import SettingsError

SAMPLERS = ("KSampler", "KSamplerAdvanced")
TEXT_ENCODERS = ("CLIPTextEncode",)
LATENTS = ("EmptySD3LatentImage", "EmptyLatentImage")
SHIFTS = ("ModelSamplingAuraFlow", "ModelSamplingSD3")
LORAS = ("LoraLoaderModelOnly", "LoraLoader")
MODEL_LOADERS = ("UNETLoader", "CheckpointLoaderSimple", "CheckpointLoader")
NO_NEGATIVE = ("ConditioningZeroOut",)
# Widget order of the nodes read here, as the UI graph stores `widgets_values` (the API graph names them).
WIDGETS: dict[str, tuple[str, ...]] = {
    "KSampler": ("seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "KSamplerAdvanced": (
        "add_noise", "noise_seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler",
        "start_at_step", "end_at_step", "return_with_leftover_noise",
    ),
    "CLIPTextEncode": ("text",),
    "ModelSamplingAuraFlow": ("shift",),
    "ModelSamplingSD3": ("shift",),
    "EmptySD3LatentImage": ("width", "height", "batch_size"),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "LoraLoaderModelOnly": ("lora_name", "strength_model"),
    "LoraLoader": ("lora_name", "strength_model", "strength_clip"),
    "UNETLoader": ("unet_name", "weight_dtype"),
    "CheckpointLoaderSimple": ("ckpt_name",),
}
EULER_SAMPLERS = ("euler",)
MAX_DEPTH = 64  # links followed from the sampler: a graph is never that deep, a cycle ends here
BYPASSED = (2, 4)  # UI graph node modes: muted, bypassed


@dataclass
class ComfyRead:
    """Settings found in the graph, and one note per thing not carried over."""

    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def settings_from_comfy(prompt: Any = None, workflow: Any = None) -> ComfyRead:
    """Our settings from ComfyUI's API graph (`prompt`), else its UI graph (`workflow`)."""
    graph = prompt if _is_api_graph(prompt) else api_graph_from_workflow(workflow)
    if not graph:
        raise SettingsError("the ComfyUI metadata holds no graph of nodes")
    return _Reader(graph).read()


def _is_api_graph(data: Any) -> bool:
    return isinstance(data, Mapping) and any(isinstance(n, Mapping) and "class_type" in n for n in data.values())


def api_graph_from_workflow(workflow: Any) -> dict[str, dict[str, Any]]:
    """The UI graph as an API graph: each node's linked inputs as [node id, slot], its widgets by name
    (WIDGETS); muted and bypassed nodes are marked so the reader passes through them."""
    if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
        return {}
    sources = {}
    for link in workflow.get("links") or []:
        if isinstance(link, list) and len(link) >= 3:
            sources[link[0]] = [str(link[1]), link[2]]
    graph: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        if not isinstance(node, Mapping) or "id" not in node:
            continue
        kind = str(node.get("type", ""))
        inputs: dict[str, Any] = {}
        widgets = node.get("widgets_values")
        if isinstance(widgets, list):
            inputs.update(zip(WIDGETS.get(kind, ()), widgets, strict=False))
        for slot in node.get("inputs") or []:
            if isinstance(slot, Mapping) and slot.get("link") in sources:
                inputs[str(slot.get("name"))] = sources[slot["link"]]
        graph[str(node["id"])] = {"class_type": kind, "inputs": inputs, "bypassed": node.get("mode") in BYPASSED}
    return graph


class _Reader:
    """Walks an API graph from its sampler."""

    def __init__(self, graph: Mapping[str, Any]):
        self.graph = graph
        self.out = ComfyRead()

    def read(self) -> ComfyRead:
        samplers = sorted((k for k, n in self._nodes() if n.get("class_type") in SAMPLERS), key=_node_order)
        if not samplers:
            kinds = sorted({str(n.get("class_type")) for _, n in self._nodes()})
            raise SettingsError(f"no KSampler in this ComfyUI graph (nodes: {', '.join(kinds[:12])}); its settings cannot be read")
        if len(samplers) > 1:
            self.note(f"{len(samplers)} samplers in the graph; node {samplers[0]}'s settings were read")
        sampler = self.graph[samplers[0]]["inputs"]
        self._sampling(sampler)
        self.out.settings["prompt"] = self._text(sampler.get("positive"), "prompt")
        self.out.settings["negative_prompt"] = self._text(sampler.get("negative"), "negative prompt")
        self._model_chain(sampler.get("model"))
        self._latent(sampler.get("latent_image"))
        self.out.settings = {k: v for k, v in self.out.settings.items() if v is not None}
        return self.out

    def note(self, text: str) -> None:
        self.out.notes.append(text)

    def _nodes(self) -> list[tuple[str, Mapping[str, Any]]]:
        return [(str(k), n) for k, n in self.graph.items() if isinstance(n, Mapping)]

    def _value(self, value: Any, depth: int = 0) -> Any:
        """A literal input, or the value of the node it is linked to (a primitive, seed or text node)."""
        if not _is_link(value):
            return value
        node = self._node(value)
        if node is None or depth > MAX_DEPTH:
            return None
        inputs = node.get("inputs") or {}
        for name in ("value", "seed", "noise_seed", "int", "float", "text", "string", "number"):
            if name in inputs:
                return self._value(inputs[name], depth + 1)
        return None

    def _node(self, link: Any) -> Mapping[str, Any] | None:
        node = self.graph.get(str(link[0])) if _is_link(link) else None
        return node if isinstance(node, Mapping) else None

    def _sampling(self, inputs: Mapping[str, Any]) -> None:
        s = self.out.settings
        s["seed"] = _whole(self._value(inputs.get("seed", inputs.get("noise_seed"))))
        s["num_inference_steps"] = _whole(self._value(inputs.get("steps")))
        cfg = _number(self._value(inputs.get("cfg")))
        if cfg is not None:
            s["guidance_scale"] = round(max(0.0, cfg - 1.0), 6)
            if cfg != 1.0:
                self.note(f"ComfyUI cfg {cfg:g} is guidance_scale {s['guidance_scale']:g} here (ComfyUI's cfg 1 = no guidance)")
        sampler, scheduler = self._value(inputs.get("sampler_name")), self._value(inputs.get("scheduler"))
        if sampler not in EULER_SAMPLERS or scheduler not in ("simple", "normal", None):
            self.note(
                f"ComfyUI sampler {sampler}/{scheduler} not carried over: this program samples with Euler on its "
                "shifted linear schedule, so the image will differ"
            )
        denoise = _number(self._value(inputs.get("denoise")))
        if denoise is not None and denoise < 1.0:
            self.note(f"ComfyUI denoise {denoise:g} (image-to-image) not carried over: a full generation runs")

    def _text(self, link: Any, what: str) -> str | None:
        """The text of the conditioning an input is linked to, following pass-through nodes."""
        for _ in range(MAX_DEPTH):
            node = self._node(link)
            if node is None:
                return None
            kind, inputs = node.get("class_type"), node.get("inputs") or {}
            if kind in NO_NEGATIVE:
                return ""
            if kind in TEXT_ENCODERS or ("text" in inputs and not node.get("bypassed")):
                text = self._value(inputs.get("text"))
                return text if isinstance(text, str) else None
            link = next((v for k, v in inputs.items() if _is_link(v) and "conditioning" in k), None)
        self.note(f"the {what} could not be traced in the graph")
        return None

    def _model_chain(self, link: Any) -> None:
        """Shift and LoRAs from the sampler's model input back to the loader; LoRAs in the order they apply."""
        loras: list[tuple[str, float]] = []
        for _ in range(MAX_DEPTH):
            node = self._node(link)
            if node is None:
                break
            kind, inputs = node.get("class_type"), node.get("inputs") or {}
            if node.get("bypassed"):
                pass
            elif kind in SHIFTS:  # the one nearest the sampler is applied last: it wins
                self.out.settings.setdefault("flow_shift", _number(self._value(inputs.get("shift"))))
            elif kind in LORAS:
                name, strength = self._value(inputs.get("lora_name")), _number(self._value(inputs.get("strength_model")))
                if isinstance(name, str) and name:
                    loras.append((name.replace("\\", "/"), 1.0 if strength is None else strength))
            elif kind in MODEL_LOADERS:
                loader = self._value(inputs.get("unet_name", inputs.get("ckpt_name")))
                self.note(f"ComfyUI model {loader}: the model type comes from the form or --model, not the file name")
                break
            else:
                self.note(f"ComfyUI node {kind} on the model not carried over")
            link = inputs.get("model")
        loras.reverse()
        if loras:
            self.out.settings["activated_loras"] = [name for name, _ in loras]
            self.out.settings["loras_multipliers"] = " ".join(f"{strength:g}" for _, strength in loras)

    def _latent(self, link: Any) -> None:
        node = self._node(link)
        if node is None:
            return
        inputs = node.get("inputs") or {}
        if node.get("class_type") not in LATENTS:
            self.note(f"ComfyUI latent from {node.get('class_type')} (not an empty latent) not carried over")
            return
        width, height = _whole(self._value(inputs.get("width"))), _whole(self._value(inputs.get("height")))
        if width and height:
            self.out.settings["resolution"] = f"{width}x{height}"
        self.out.settings["batch_size"] = _whole(self._value(inputs.get("batch_size")))


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) and isinstance(value[1], int)


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 62, node_id)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _whole(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None
