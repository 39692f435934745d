"""Python API and `import wgp`: importing does nothing; load_model/generate/release work and cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import wgp
from common.errors import SettingsError
from host import api
from tests.fixtures.host_env import toy_env

REPO = Path(__file__).resolve().parents[1]


def test_importing_wgp_does_nothing(tmp_path: Path) -> None:
    code = (
        "import sys, os; before = set(os.listdir('.')); import wgp; "
        "assert 'gradio' not in sys.modules, 'gradio imported'; "
        "assert 'huggingface_hub' not in sys.modules, 'hub imported'; "
        "assert set(os.listdir('.')) == before, 'files created'; "
        # nor the libraries only a loaded model, a batch on Ray or the web UI need: not even the CLI's module
        "import host.cli; heavy = {'gradio', 'diffusers', 'transformers', 'mmgp', 'optimum', 'ray', 'peft', 'accelerate'}; "
        "loaded = sorted(heavy & {m.split('.')[0] for m in sys.modules}); assert not loaded, f'imported: {loaded}'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_load_generate_release(tmp_path: Path) -> None:
    config = toy_env(tmp_path)
    model = wgp.load_model("toy", config=config, num_inference_steps=2)
    images = model.generate(prompt="a toy car", seed=7)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert model.last_result is not None and model.last_result.settings["num_inference_steps"] == 2
    again = model.generate(prompt="a toy car", seed=7)
    assert again[0].tobytes() == images[0].tobytes()
    loads = sys.modules[type(model.session.registry.handler_for("toy")).__module__].LOADS
    assert len(loads) == 1  # cached between calls
    saved = model.generate("a toy car", seed=7, batch_size=2, output_dir=tmp_path / "out")
    assert len(saved) == 2 and len(list((tmp_path / "out").glob("*.png"))) == 2
    wgp.release_model()
    assert api.get_session()._loaded is None
    model.generate("after release", seed=1)
    assert len(loads) == 2


def test_bad_setting_is_reported_at_the_call(tmp_path: Path) -> None:
    model = wgp.load_model("toy", config=toy_env(tmp_path))
    with pytest.raises(SettingsError, match="did you mean 'guidance_scale'"):
        model.generate("x", guidance=3)
