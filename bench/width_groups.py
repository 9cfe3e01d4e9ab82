"""Time width_groups on a ResNet-50-shaped network: tracing vs reading the groups.

``width_groups`` = trace (``torch.export`` or ``torch.fx``) + interpret (one axis rule per
op, union-find) + collect (groups, layouts). The trace is torch's work and dominates;
this script reports the three parts separately, per tracer, so that the later
``bench/widen_graph.py`` can report tracing apart from widening. The first export in a
process also pays torch's one-off setup: it is reported on its own line.

``resnet50_shaped()`` builds torchvision's ResNet-50 layout by hand (torchvision's C ops
do not load beside the CPU wheel here): stem 7x7/2 conv + max pool, bottleneck stages
[3, 4, 6, 3] of widths 64-512 (x4 expansion, projection shortcuts), a 1000-way head;
25.6 M parameters. Its groups: the stem, 32 inner bottleneck widths and 4 stages.

Usage::

    python bench/width_groups.py            # float32, input 1x3x64x64, 3 repeats
    python bench/width_groups.py --quick    # one repeat
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

from torch_embed.graph.groups import _collect
from torch_embed.graph.ops import interpret
from torch_embed.graph.trace import trace


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            layer = []
            for j in range(n):
                layer.append(_Bottleneck(cin, width, 2 if j == 0 and i > 1 else 1))
                cin = 4 * width
            self.add_module(f"layer{i}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_shaped() -> nn.Module:
    """torchvision's ResNet-50 layout and FQNs, random init, eval mode."""
    torch.manual_seed(0)
    return _ResNet().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    args = parser.parse_args()
    model = resnet50_shaped()
    x = torch.randn(1, 3, args.size, args.size)
    params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-50-shaped, {params / 1e6:.1f} M parameters, input {tuple(x.shape)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    trace(model, (x,), "export")
    first = time.perf_counter() - t
    print(f"first export in this process (torch's one-off setup included): {first:.2f} s")
    print("tracer        trace s  interpret s  collect s  groups  hidden")
    for tracer in ("export", "fx"):
        best = (float("inf"), 0.0, 0.0)
        for _ in range(1 if args.quick else 3):
            t0 = time.perf_counter()
            traced = trace(model, (x,), tracer)  # type: ignore[arg-type]
            t1 = time.perf_counter()
            it = interpret(traced)
            t2 = time.perf_counter()
            groups = _collect(it, traced.inputs)
            t3 = time.perf_counter()
            best = min(best, (t1 - t0, t2 - t1, t3 - t2))
        hidden = sum(g.hidden for g in groups)
        times = f"{best[0]:7.2f}  {best[1]:11.3f}  {best[2]:9.3f}"
        print(f"{tracer:12s}  {times}  {len(groups):6d}  {hidden:6d}")


if __name__ == "__main__":
    main()
