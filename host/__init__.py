"""The family-agnostic host: discovery, presets, files, tasks, outputs, the Python API and the CLI.

Nothing here imports a model family by name: families are found as `models/<family>/*_handler.py`.
Importing this package does nothing (no prints, no folders, no downloads).
"""

__version__ = "0.1.0"
PROGRAM_NAME = "wgp-zimage"
