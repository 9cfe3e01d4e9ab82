"""Make the torch_embed pytest plugin's fixtures available to the tests in this folder.

Installed (``pip install -e .``), pytest loads ``torch_embed.pytest_plugin`` through its
``pytest11`` entry point. This repository's tests also run without installing, so the
fixtures are imported here. (``pytest_plugins = [...]`` is not used: pytest refuses it in
a conftest below the root, and it would register the module a second time when the
entry point has already loaded it.)
"""

from torch_embed.pytest_plugin import (  # noqa: F401
    float64,
    mlp_factory,
    regression_data,
    torch_embed_generator,
    torch_embed_seed,
)
