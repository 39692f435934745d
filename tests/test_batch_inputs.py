"""Batch inputs with the toy family (no torch model): CSV/JSONL/JSON rows, --set defaults, the prompt
template, every bad row reported with its line before any model loads, ids and seeds, task order."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from common.errors import SettingsError
from host import cli
from host.batch.inputs import Template, parse_set_options, read_rows
from host.batch.job import BatchOptions, run_batch
from host.batch.plan import order_items, prepare_rows
from host.lora.task import LoraChoice
from host.session import Session
from tests.fixtures.host_env import TOY_PRESET, cli_args, toy_env

TOY_B = {**TOY_PRESET, "model": {**TOY_PRESET["model"], "name": "Toy B"}}


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(toy_env(tmp_path, presets={"toy_b": TOY_B}))


def _loads(session: Session) -> list:
    return sys.modules[type(session.registry.handler_for("toy")).__module__].LOADS


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_cells_and_set_values_are_typed_by_the_models_schema(session: Session, tmp_path: Path) -> None:
    # the toy family refuses numbers written as text ("8"): only typing by the schema lets a CSV through
    source = _write(tmp_path / "rows.csv", "product,style,num_inference_steps,toy_invert\nmug,studio,4,true\nlamp,ink,,false\n")
    template = Template.parse("photo of {product}, {style}")
    rows = read_rows(source, {"model_type": "toy", "guidance_scale": "2.5"}, template, text_defaults={"guidance_scale"})
    items, invalid = prepare_rows(session, rows, template.fields)
    assert invalid == []
    first, second = (item.task.settings for item in items)
    assert first["prompt"] == "photo of mug, studio" and second["prompt"] == "photo of lamp, ink"
    assert (first["num_inference_steps"], first["toy_invert"], first["guidance_scale"]) == (4, True, 2.5)
    assert second["num_inference_steps"] == 3  # empty cell: the preset's value
    assert "product" not in first and "style" not in first  # template columns are not settings
    assert [item.spec.row for item in items] == [2, 3]


def test_ids_and_derived_seeds_are_stable_and_distinct(session: Session, tmp_path: Path) -> None:
    source = _write(tmp_path / "rows.jsonl", '{"model_type": "toy"}\n{"model_type": "toy"}\n{"model_type": "toy", "seed": 9}\n')
    first, _ = prepare_rows(session, read_rows(source))
    again, _ = prepare_rows(session, read_rows(source))
    assert [i.spec.id for i in first] == [i.spec.id for i in again]
    assert [i.spec.settings["seed"] for i in first] == [i.spec.settings["seed"] for i in again]
    seeds = [i.spec.settings["seed"] for i in first]
    assert seeds[0] != seeds[1] and seeds[2] == 9 and all(0 <= s < 2**32 for s in seeds)  # equal rows, other seeds
    assert [i.spec.id.split("-")[0] for i in first] == ["1", "2", "3"]
    changed, _ = prepare_rows(session, read_rows(_write(tmp_path / "rows.jsonl", '{"model_type": "toy", "guidance_scale": 1}\n')))
    assert changed[0].spec.id != first[0].spec.id  # another setting: another task


def test_every_bad_row_is_reported_with_its_line_before_any_model_loads(session: Session, tmp_path: Path) -> None:
    source = _write(
        tmp_path / "rows.csv",
        "model_type,prompt,num_inference_steps,seed\n"
        "toy,good one,3,1\n"
        "toy,bad steps,three,2\n"
        'toy,"quoted, comma",3,3\n'
        "toy,too,many,values,here\n"
        "nope,unknown model,3,5\n"
        "toy,good two,3,6\n"
        "toy,typo,3,7,\n",
    )
    err = _LoadsAtWrite(_loads(session))
    counts = run_batch(session, source, BatchOptions(), err=err)
    text = err.getvalue()
    assert "rows.csv line 3: 'num_inference_steps' must be an integer (got 'three')" in text
    assert "rows.csv lines 5, 8: 5 values but the header names 4 columns (quote cells holding commas)" in text
    assert "INVALID rows.csv line 6: unknown model_type 'nope'; known: toy" in text
    assert err.loads_when_reported == [0, 0, 0]  # every INVALID line came before the first load
    assert (counts.done, counts.invalid, counts.failed) == (3, 4, 0)
    assert len(list((tmp_path / "outputs").glob("*.png"))) == 3


def test_rows_with_the_same_problem_share_one_line(session: Session, tmp_path: Path) -> None:
    source = _write(tmp_path / "rows.csv", "model_type,promt\n" + "toy,x\n" * 4 + "toy_b,y\n")
    err = io.StringIO()
    counts = run_batch(session, source, BatchOptions(), err=err)
    assert "INVALID rows.csv lines 2-6: unknown setting 'promt'; did you mean 'prompt'?" in err.getvalue()
    assert counts.invalid == 5 and not counts.ok


def test_json_list_and_jsonl_rows_and_their_errors(tmp_path: Path) -> None:
    rows = read_rows(_write(tmp_path / "a.json", '[{"prompt": "x"}, 3]'), {"model_type": "toy"})
    assert [r.where for r in rows] == ["a.json item 1", "a.json item 2"]
    assert rows[0].settings == {"model_type": "toy", "prompt": "x"} and "a task is a JSON object" in str(rows[1].error)
    rows = read_rows(_write(tmp_path / "b.jsonl", '{"prompt": "x"}\n\n{"prompt": \n'))
    assert [r.number for r in rows] == [1, 3] and "b.jsonl line 3: not valid JSON" in str(rows[1].error)
    rows = read_rows(_write(tmp_path / "c.jsonl", '{"prompt": "a\u2028b"}\r\n{"prompt": "c"}\n'))  # a raw U+2028 in a string
    assert [(r.number, r.settings["prompt"], r.error) for r in rows] == [(1, "a\u2028b", None), (2, "c", None)]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: read_rows(_write(p / "x.txt", "")), "a batch file is .json, .jsonl or .csv"),
        (lambda p: read_rows(_write(p / "x.csv", "a,a\n1,2\n")), "the header repeats a"),
        (lambda p: read_rows(_write(p / "x.json", "{nope")), "x.json: not valid JSON"),
        (lambda p: read_rows(p / "missing.csv"), "cannot read this batch file"),
        (lambda p: Template.parse("photo of {}"), "placeholders are column names"),
        (lambda p: Template.parse("photo of {a:>9}"), "placeholders are column names"),
        (lambda p: Template.parse("photo of {a"), "write a literal brace"),
        (lambda p: parse_set_options(["steps"]), "write KEY=VALUE"),
        (lambda p: read_rows(_write(p / "x.csv", "product\nmug\n"), template=Template.parse("{product} {style}")),
         r"--template uses \{style\} but .*x.csv has no such column"),
    ],
)
def test_unusable_inputs_are_one_clear_error(tmp_path: Path, make, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected):
        make(tmp_path)


def test_template_column_may_come_from_set(tmp_path: Path) -> None:
    rows = read_rows(_write(tmp_path / "x.csv", "product\nmug\n"), {"style": "ink"}, Template.parse("{product} in {style}"))
    assert rows[0].settings["prompt"] == "mug in ink"


def test_tasks_are_grouped_by_model_then_loras_in_first_seen_order(session: Session, tmp_path: Path) -> None:
    lines = "".join(json.dumps({"model_type": m, "seed": i}) + "\n" for i, m in enumerate(["toy", "toy_b"] * 4))
    items, _ = prepare_rows(session, read_rows(_write(tmp_path / "rows.jsonl", lines)))
    for item, lora in zip(items, ["a", "b", "b", "a", "a", "b", "b", "a"], strict=True):
        item.task.loras = LoraChoice([lora], [Path(f"/l/{lora}.safetensors")], [1.0])
    ordered = order_items(items)
    assert [(i.task.model_type, i.task.loras.names[0], i.spec.row) for i in ordered] == [
        ("toy", "a", 1), ("toy", "a", 5), ("toy", "b", 3), ("toy", "b", 7),
        ("toy_b", "b", 2), ("toy_b", "b", 6), ("toy_b", "a", 4), ("toy_b", "a", 8),
    ]


def test_alternating_models_load_once_each(session: Session, tmp_path: Path) -> None:
    lines = "".join(json.dumps({"model_type": m, "seed": i}) + "\n" for i, m in enumerate(["toy", "toy_b"] * 5))
    loads = _loads(session)
    before = len(loads)
    counts = run_batch(session, _write(tmp_path / "rows.jsonl", lines), BatchOptions(), err=io.StringIO())
    assert counts.done == 10 and len(loads) - before == 2  # file order would load 10 times


def test_cli_batch_flags_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = toy_env(tmp_path)
    source = _write(tmp_path / "rows.csv", "product\nmug\nlamp\n")
    flags = ["--batch", str(source), "--model", "toy", "--template", "a {product}", "--set", "num_inference_steps=2", "--seed", "4"]
    assert cli.main([*flags, *cli_args(config)]) == 0
    records = [json.loads(line) for line in (config.output_dir / "rows.manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [4, 4] and all(r["status"] == "done" for r in records)
    out = capsys.readouterr().out
    assert "batch of 2 row(s): 2 done, 0 failed" in out
    assert cli.main(["--batch", str(source), "--workers", "2", *cli_args(config)]) == 1
    assert "--workers counts Ray workers: give --ray too" in capsys.readouterr().err


def test_ray_missing_says_how_to_install(session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the package
    source = _write(tmp_path / "rows.jsonl", '{"model_type": "toy"}\n')
    with pytest.raises(SettingsError, match=r"--ray needs Ray, an optional install: pip install -r requirements-ray.txt"):
        run_batch(session, source, BatchOptions(ray="auto"), err=io.StringIO())


class _LoadsAtWrite(io.StringIO):
    """stderr that notes how many models had been loaded when each INVALID line was written."""

    def __init__(self, loads: list):
        super().__init__()
        self.loads, self.start, self.loads_when_reported = loads, len(loads), []

    def write(self, text: str) -> int:
        if text.startswith("INVALID"):
            self.loads_when_reported.append(len(self.loads) - self.start)
        return super().write(text)


def test_progress_shows_images_per_minute_eta_and_failures() -> None:
    from host.batch.progress import BatchCounts, BatchProgress

    times = iter([0.0, 30.0, 45.0])
    stream, counts = io.StringIO(), BatchCounts(total_rows=5, invalid=1)
    progress = BatchProgress(4, counts, stream, clock=lambda: next(times))
    progress({"status": "done", "files": [{"path": "a.png"}, {"path": "b.png"}]})  # 2 images after 30 s
    progress({"status": "failed", "where": "rows.csv line 3", "error": "rows.csv line 3: boom"})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "batch [######..................] 1/4 | 4.0 images/min | ETA 1:30"
    assert lines[1] == "FAILED rows.csv line 3: boom"
    assert lines[2] == "batch [############............] 2/4 | 1 failed | 2.7 images/min | ETA 0:45"
    assert counts.summary() == "batch of 5 row(s): 1 done, 1 failed, 1 invalid row(s); 2 image(s) in 0:45 (2.7 images/min)"
