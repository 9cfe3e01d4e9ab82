"""Fixtures for the example tests in this folder.

In your own project you do not need this file: with torch_embed installed, pytest loads
``torch_embed.pytest_plugin`` through its ``pytest11`` entry point and the fixtures
(``torch_embed_generator``, ``mlp_factory``, ``regression_data``, ``float64``) are simply
there. This repository also runs its tests without installing the package, so the
fixtures are imported here. (``pytest_plugins = [...]`` is not used: pytest refuses it
in a conftest below the root, and it would register the plugin a second time when the
entry point has already loaded it.)
"""

from torch_embed.pytest_plugin import (  # noqa: F401
    float64,
    mlp_factory,
    regression_data,
    torch_embed_generator,
    torch_embed_seed,
)
