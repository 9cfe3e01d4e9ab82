"""The pytest plugin: fixtures, the seed option, the entry point, traceback hiding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_embed
from torch_embed import pytest_plugin
from torch_embed.pytest_plugin import make_mlp, make_regression_data

ROOT = Path(__file__).resolve().parents[2]


def test_generator_is_seeded_with_the_option_default(torch_embed_generator, torch_embed_seed):
    assert torch_embed_seed == 0  # no --torch-embed-seed in this run
    expected = torch.rand(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(5, generator=torch_embed_generator), expected)


def test_mlp_factory_builds_seeded_reproducible_networks(mlp_factory):
    net = mlp_factory([3, 6, 5, 2], "relu")
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [m.weight.shape for m in net[::2]] == [(6, 3), (5, 6), (2, 5)]
    assert net[0].weight.dtype == torch.float64
    # the fixture's stream is seeded with the seed: a fresh generator reproduces it
    again = make_mlp([3, 6, 5, 2], "relu", generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))
    # a second call draws further along the stream: a different network
    other = mlp_factory([3, 6, 5, 2], "relu")
    assert not torch.equal(other[0].weight, net[0].weight)
    # seed= depends on the seed alone
    s1, s2 = mlp_factory([2, 4, 1], seed=7), mlp_factory([2, 4, 1], seed=7)
    assert torch.equal(s1[0].weight, s2[0].weight)
    # nn.Linear's default distribution: uniform on ±1/sqrt(fan_in)
    wide_in = mlp_factory([400, 50, 1])
    w = wide_in[0].weight.detach()
    assert float(w.abs().max()) <= 1 / 20 and float(w.abs().max()) > 0.99 / 20


def test_mlp_factory_options(mlp_factory):
    net = mlp_factory([2, 3, 1], lambda: nn.Softplus(beta=2), bias=False, dtype=torch.float32)
    assert isinstance(net[1], nn.Softplus) and net[1].beta == 2
    assert net[0].bias is None and net[0].weight.dtype == torch.float32
    small = mlp_factory([100, 2000, 1], weight_std=1e-3)
    assert abs(float(small[0].weight.detach().std()) - 1e-3) < 1e-4
    assert float(small[0].bias.detach().abs().max()) == 0.0
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        mlp_factory([2, 3, 1], "swish")
    with pytest.raises(ValueError, match="at least two entries"):
        mlp_factory([2])


def test_factory_networks_are_widenable(mlp_factory, regression_data):
    net = mlp_factory([1, 4, 4, 1])
    x, _ = regression_data()
    before = net(x).detach()
    torch_embed.widen(net, [6, 9], "split", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(net(x), before, rtol=0, atol=1e-13)


def test_regression_data(regression_data):
    x, y = regression_data()
    assert x.shape == (64, 1) and y.shape == (64, 1) and x.dtype == torch.float64
    assert float(x.min()) >= -15 and float(x.max()) <= 15
    # the staircase: three tanh steps at -8, 0, 8 (centred)
    ref = torch.tanh(x - 8) + torch.tanh(x) + torch.tanh(x + 8)
    assert torch.allclose(y, ref - ref.mean(), atol=1e-14)
    x2, y2 = regression_data(32, 4, 3, noise=0.1, dtype=torch.float32)
    assert x2.shape == (32, 4) and y2.shape == (32, 3) and y2.dtype == torch.float32
    again = make_regression_data(64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], x)  # the fixture's stream is seeded with seed + 1


def test_float64_fixture_sets_the_default_dtype(float64):
    assert float64 is torch.float64
    assert torch.get_default_dtype() == torch.float64
    assert nn.Linear(2, 2).weight.dtype == torch.float64


def test_entry_point_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.entry-points.pytest11]", 1)[1].split("[", 1)[0]
    assert section.strip() == 'torch_embed = "torch_embed.pytest_plugin"'
    assert callable(pytest_plugin.pytest_addoption)


_OUTER_TESTS = """
import copy
import torch
from torch import nn
import torch_embed
from torch_embed.testing import assert_function_preserved


def test_seed(torch_embed_seed, torch_embed_generator):
    assert torch_embed_seed == 7
    expected = torch.rand(3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(3, generator=torch_embed_generator), expected)


def test_a_float64(float64):
    assert torch.get_default_dtype() == torch.float64


def test_b_restored():
    assert torch.get_default_dtype() == torch.float32


def test_broken_widening(mlp_factory):
    net = mlp_factory([2, 3, 1])
    narrow = copy.deepcopy(net)
    torch_embed.widen(net, [5], "split")
    with torch.no_grad():
        net[2].weight[0, 4] += 1.0
    assert_function_preserved(narrow, net, torch.ones(4, 2, dtype=torch.float64))
"""


def test_plugin_in_a_fresh_pytest_run(tmp_path):
    """Loaded with -p (as the entry point does): the option, the header, restoring the
    dtype between tests, and a failure whose traceback points at the test, not at
    torch_embed/testing.py (``__tracebackhide__``)."""
    (tmp_path / "test_outer.py").write_text(textwrap.dedent(_OUTER_TESTS))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        # the entry point would load the plugin a second time when torch_embed is installed
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "torch_embed.pytest_plugin",
            "--torch-embed-seed=7",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            str(tmp_path / "pytest.ini"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert "torch_embed: --torch-embed-seed=7" in out
    assert "1 failed, 3 passed" in out, out
    assert "FAILED test_outer.py::test_broken_widening" in out
    assert "widened output differs from the reference output" in out
    assert "test_outer.py:29: AssertionError" in out, out  # the failing line of the test
    assert "torch_embed/testing.py" not in out, out
