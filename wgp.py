"""wgp: local image generation with the Z-Image family (Wan2GP-style host).

    python wgp.py                                  web UI (http://127.0.0.1:7860)
    python wgp.py --process tasks.json             headless tasks (JSON or saved images)
    python wgp.py --batch rows.csv --model z_image resumable batch (CSV, JSONL, JSON; --ray for a cluster)
    python wgp.py --model z_image --prompt "..."   one image
    python wgp.py --selftest                       tiny self-test model, no download
    python wgp.py --list-models

Python:
    import wgp
    model = wgp.load_model("z_image_base")
    images = model.generate(prompt="a red fox in the snow", seed=42)

Importing this module does nothing else: no UI, no downloads, no prints.
"""

from __future__ import annotations

import sys

from host import __version__
from host.api import Model, load_model, release_model


def main() -> int:
    """Command-line entry point (see `python wgp.py --help`)."""
    from host.cli import main as cli_main

    return cli_main(sys.argv[1:])


__all__ = ["Model", "__version__", "load_model", "main", "release_model"]

if __name__ == "__main__":
    sys.exit(main())
