"""Import mmgp without letting it break transformers.

Importing mmgp replaces `safe_open` / `load_file` in safetensors, accelerate and transformers with its
own loader, whose signature lacks the `backend` argument that transformers >= 5.13 passes: every
`from_pretrained` afterwards fails with "unexpected keyword argument 'backend'". mmgp's own loaders
call its module directly, so putting the originals back right after the import costs it nothing.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

log = logging.getLogger(__name__)

# (module, attribute) pairs mmgp overwrites on import.
PATCHED = (
    ("safetensors", "safe_open"),
    ("safetensors.torch", "load_file"),
    ("accelerate.utils.modeling", "safe_open"),
    ("accelerate.utils.modeling", "safe_load_file"),
    ("transformers.modeling_utils", "safe_open"),
    ("transformers.modeling_utils", "safe_load_file"),
)


def import_mmgp_offload() -> ModuleType:
    """`mmgp.offload`, imported with the originals of the functions it patches restored afterwards."""
    saved = {}
    for module_name, attr in PATCHED:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, attr):
            saved[(module_name, attr)] = getattr(module, attr)
    already = "mmgp.offload" in sys.modules
    try:
        from mmgp import offload
    except ImportError as exc:
        raise ImportError("mmgp is not installed: pip install mmgp (needed for offloading on CUDA)") from exc
    finally:
        restore(saved)
    if not already:
        log.debug("imported mmgp; restored %d patched loader functions", len(saved))
    return offload


def restore(saved: dict[tuple[str, str], object]) -> None:
    """Put the saved functions back on their modules."""
    for (module_name, attr), value in saved.items():
        setattr(sys.modules[module_name], attr, value)
