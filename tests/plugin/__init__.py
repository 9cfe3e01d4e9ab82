"""Tests of the torch_embed pytest plugin (a package, so its conftest has a unique module name)."""
