"""CLI: exit codes, a task list with bad tasks, regenerating from a saved image, one-shot, list."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from host import cli
from host.session import HostConfig, Session
from tests.fixtures.host_env import cli_args, toy_env, write_json


@pytest.fixture
def env(tmp_path: Path) -> HostConfig:
    config = toy_env(tmp_path)
    missing = {"model": {"name": "No files", "architecture": "toy", "URLs": ["absent/absent_bf16.safetensors"]}}
    write_json(config.finetunes_dir / "toy_missing.json", missing)
    return config


def _images(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.exists() else []


def test_all_good_tasks_exit_0_and_save(env: HostConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = write_json(tmp_path / "tasks.json", [{"model_type": "toy", "seed": 1}, {"model_type": "toy", "seed": 2, "batch_size": 2}])
    assert cli.main([*cli_args(env), "--process", str(tasks)]) == 0
    assert len(_images(env.output_dir)) == 3
    out = capsys.readouterr()
    assert "2 of 2 task(s) succeeded" in out.out
    assert "s/it" in out.err + out.out and "peak RSS" in out.out


def test_bad_tasks_fail_alone_and_exit_1(env: HostConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = [
        {"model_type": "toy", "seed": 1, "prompt": "first"},
        {"model_type": "toy", "resolution": "30x30"},  # bad resolution
        {"model_type": "toy_nope"},  # unknown model type
        {"model_type": "toy_missing"},  # missing file
        {"model_type": "toy", "prompt": "CRASH"},  # fails while generating
        {"model_type": "toy", "prompt": "CANCEL"},  # cancelled by its callback
        {"model_type": "toy", "seed": 2, "prompt": "last"},
    ]
    path = write_json(tmp_path / "tasks.json", tasks)
    assert cli.main([*cli_args(env), "--process", str(path)]) == 1
    names = [p.name for p in _images(env.output_dir)]
    assert len(names) == 2 and any("first" in n for n in names) and any("last" in n for n in names)
    assert [p.name for p in env.output_dir.iterdir() if p.name.startswith(".")] == []  # no half-written temp files
    err = capsys.readouterr()
    assert f"FAILED {path}[1]: width and height must be multiples of 16" in err.err
    assert "unknown model_type 'toy_nope'" in err.err
    assert "absent_bf16.safetensors" in err.err and "put it at:" in err.err
    assert "simulated out of memory" in err.err and "cancelled at step 2" in err.err
    assert "2 of 7 task(s) succeeded" in err.out


def test_saved_image_is_a_task_that_regenerates_it(env: HostConfig, tmp_path: Path) -> None:
    assert cli.main([*cli_args(env), "--model", "toy", "--prompt", "regen me"]) == 0
    [first] = _images(env.output_dir)
    again = tmp_path / "again"
    assert cli.main([*cli_args(env), "--output-dir", str(again), "--process", str(first)]) == 0
    [second] = _images(again)
    assert Image.open(first).tobytes() == Image.open(second).tobytes()


def test_one_shot_output_file_never_overwrites(env: HostConfig, tmp_path: Path) -> None:
    target = tmp_path / "pics" / "fox.jpg"
    for _ in range(2):
        assert cli.main([*cli_args(env), "--model", "toy", "--prompt", "fox", "--seed", "3", "--output", str(target)]) == 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["fox.jpg", "fox_2.jpg"]
    assert Image.open(target).format == "JPEG"


def test_ctrl_c_exits_130(env: HostConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Session, task: object, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "run", interrupted)
    assert cli.main([*cli_args(env), "--model", "toy", "--prompt", "x"]) == 130
    assert _images(env.output_dir) == []


def test_unreadable_task_file_counts_as_failed(env: HostConfig, tmp_path: Path) -> None:
    good = write_json(tmp_path / "good.json", {"model_type": "toy"})
    assert cli.main([*cli_args(env), "--process", str(tmp_path / "absent.json"), str(good)]) == 1
    assert len(_images(env.output_dir)) == 1


def test_prompt_without_model_is_an_error(env: HostConfig, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*cli_args(env), "--prompt", "x"]) == 1
    assert "--prompt needs --model" in capsys.readouterr().err


def test_list_models_groups_by_family(env: HostConfig, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*cli_args(env), "--list-models"]) == 0
    out = capsys.readouterr().out
    assert "Toy family:" in out and "toy_missing" in out


def test_family_cli_flags_are_registered(env: HostConfig, tmp_path: Path) -> None:
    session, args = cli.session_from_args([*cli_args(env), "--lora-dir-toy", str(tmp_path)])
    assert args.lora_dir_toy == tmp_path
    assert session.config.ckpts == env.ckpts
