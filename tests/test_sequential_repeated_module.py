"""A module object that appears twice in a Sequential is refused, not silently dropped.

``nn.Module.named_children()`` removes duplicates, while ``Sequential.forward`` runs the
repeated module twice; reading the children that way made widen see one hidden layer
fewer than the network has and report a misleading width count.
"""

import pytest
import torch
from torch import nn

import torch_embed


def test_repeated_linear_is_refused_and_module_unchanged() -> None:
    shared = nn.Linear(4, 4)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), shared, nn.Tanh(), shared)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    msg = r"layer 4 \(Linear\) is the same module object as layer 2"
    with pytest.raises(ValueError, match=msg):
        torch_embed.widen(net, [5, 5])
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_repeated_activation_is_refused() -> None:
    act = nn.Tanh()
    net = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 1))
    msg = r"layer 3 \(Tanh\) is the same module object as layer 1"
    with pytest.raises(ValueError, match=msg):
        torch_embed.widen(net, [5, 5])
