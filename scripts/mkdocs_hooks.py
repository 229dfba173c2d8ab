"""MkDocs hooks of the documentation site (mkdocs.yml, ``hooks:``).

* before every build, regenerate docs/configuration.md from configs/, so ``mkdocs
  build`` and ``mkdocs serve`` work on their own, not only through ``make docs``
  (the page is rewritten only when its text changes: ``mkdocs serve`` does not loop);
* in the API reference, drop the Sphinx roles of the docstrings (``:func:`x``` is
  rendered as ``:func:<code>x</code>``), leaving the name in code.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("gen_config_docs.py")
ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|obj|exc):(?=<code>)")


def on_pre_build(config: Any, **kwargs: Any) -> None:
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.main(["--out", str(Path(config["docs_dir"]) / "configuration.md")])


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub("", html)
