"""Test configuration shared by the whole suite.

Hypothesis runs derandomized (the same examples on every run and machine), without a
deadline (the first call into torch can be slow) and without an example database (so
a run leaves no files behind). Tests set their own modest ``max_examples``; the
generated property tests (tests/test_properties.py) scale theirs with the profile's
``max_examples``, 100 in CI. For a longer, randomized search, run
``pytest tests/test_properties.py --hypothesis-profile=torch_embed-explore`` (10x the
examples, a fresh random seed each run; a failure prints the blob to reproduce it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "torch_embed",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "torch_embed-explore",
    parent=settings.get_profile("torch_embed"),
    derandomize=False,
    max_examples=1000,
)
settings.load_profile("torch_embed")


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator, fresh for every test."""
    return torch.Generator().manual_seed(20260101)


def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (restored afterwards).

    The suite's networks are tiny: an OpenMP parallel region costs more than the work,
    and on a loaded 2-core machine each one can wait milliseconds for a second core
    (an eval-mode BatchNorm1d on 16x5 inputs: 23 ms with 2 threads, 30 µs with one).
    """
    yield from _one_thread()


@pytest.fixture(scope="module")
def single_thread_module():
    """:func:`single_thread` for a whole module, its module-scoped fixtures included.

    Use as ``pytestmark = pytest.mark.usefixtures("single_thread_module")``: fixtures
    named by ``usefixtures`` are set up before the other fixtures of their scope.
    """
    yield from _one_thread()


@pytest.fixture
def clean_registry():
    """Restore torch_embed's element-wise registry after a test that registers types."""
    from torch_embed import _sequential

    saved = dict(_sequential._REGISTRY)
    try:
        yield _sequential._REGISTRY
    finally:
        _sequential._REGISTRY.clear()
        _sequential._REGISTRY.update(saved)
