"""Sphinx configuration for the torch_embed documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` from the
repository root (see docs/README.md). Pages are Markdown (MyST); the API reference is
generated from the docstrings (autodoc + napoleon, Google style). No extension needs
the network: intersphinx is off.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # autodoc imports torch_embed from the checkout

import torch_embed  # noqa: E402

project = "torch_embed"
author = "torch_embed developers"
copyright = "torch_embed developers"
release = torch_embed.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"

# Only pages are sources: not the build output, not this folder's README (how to build),
# not pytest-only example files, not the figures' JSON.
exclude_patterns = [
    "_build",
    "README.md",
    "examples",
    "**/*.json",
    "conftest.py",
]

# --- MyST ---------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# --- autodoc / napoleon ---------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # no bare lists of dataclass fields
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autosummary_generate = False  # summary tables only; the entries are documented in api.md
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
napoleon_use_ivar = True  # "Attributes:" as fields: dataclass fields are not listed twice

# --- HTML ---------------------------------------------------------------------------
try:  # furo if installed (the docs extra), else Sphinx's bundled theme
    import furo  # noqa: F401

    html_theme = "furo"
except ImportError:  # pragma: no cover - depends on the environment
    html_theme = "alabaster"
html_title = f"torch_embed {release}"
html_static_path = ["_static"]
