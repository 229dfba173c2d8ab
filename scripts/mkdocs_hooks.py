"""MkDocs hook: regenerate docs/configuration.md from configs/ before every build.

So ``mkdocs build`` and ``mkdocs serve`` work on their own, not only through
``make docs``. The page is rewritten only when its text changes, so ``mkdocs
serve`` does not rebuild in a loop.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("gen_config_docs.py")


def on_pre_build(config: Any, **kwargs: Any) -> None:
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.main(["--out", str(Path(config["docs_dir"]) / "configuration.md")])
