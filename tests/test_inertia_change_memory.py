"""inertia_change's HVP path batches its products by the free memory, as hessian.py does.

The old private ``_hvp_rows`` pushed every complement direction of a block through one
``vmap`` whatever the memory; it now runs through
:class:`~torch_embed.hessian.HessianOperator`, whose batches are sized from the
available memory (``hessian._available_bytes``).
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_embed
from torch_embed.inertia_change import complement_blocks

# the module (torch_embed.hessian is also the name of the function the package exports)
hessian_module = importlib.import_module("torch_embed.hessian")


def test_hvp_blocks_are_batched_by_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    wide = copy.deepcopy(net)
    emb = torch_embed.widen(wide, [6], torch_embed.Split(alpha=0.3))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, 2, generator=g, dtype=torch.float64)
    reference = complement_blocks(emb, wide, nn.MSELoss(), x, y, method="closed-form")

    rows: list[int] = []
    original = hessian_module._Products.__call__

    def spy(self: Any, batch: Tensor, **kwargs: Any) -> Tensor:
        rows.append(int(batch.shape[0]))
        return original(self, batch, **kwargs)

    monkeypatch.setattr(hessian_module._Products, "__call__", spy)
    # room for the result (6 rows of P = 38 numbers) and hardly more: one row per pass
    monkeypatch.setattr(hessian_module, "_available_bytes", lambda device: 4000)
    blocks = complement_blocks(emb, wide, nn.MSELoss(), x, y, method="hvp")
    assert rows and max(rows) == 1 and sum(rows) == 2 * 6  # two blocks of 6 directions
    for a, b in zip(blocks, reference, strict=True):
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())
