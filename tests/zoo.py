"""A zoo of small float64 models for graph widening, each with its width groups by hand.

Every :class:`ZooCase` builds a fresh, randomly initialised (seeded) float64 model in
train mode, gives an example input, and lists the model's *hidden* width groups as
:class:`ExpectedGroup` s, derived by hand from the architecture (one comment per group
says why), never from a tracer's output. The rules are those of ``shared/GROWTH.md`` §1:
element-wise ops, pooling and per-channel norms pass a channel through; residual adds
and broadcast gates unify their operands' groups; ``cat`` makes a sum space (each part
keeps its own group); flatten factors a channel into its H·W (or token) positions.

Conventions (the tracer's tests compare against these):

* **Listed groups.** Only *hidden* groups that some module with a parameter writes. The
  model's input feature axis and its output axis are never listed, nor is a group
  with no parameterised producer (the output of an unknown op, an input-derived axis):
  none of those can grow.
* **name**: the FQN of the first module, in forward (execution) order, whose parameter
  writes the group: the output axis of a Linear/Conv weight (or its bias).
* **aliases**: every *other* module, in forward order, that has a parameter along its
  output feature axis when that *whole* axis is this group: later Linear/Conv layers
  that write into it (residual branches, projection shortcuts, SE gates), depthwise
  convs, BatchNorm/GroupNorm/LayerNorm affine, and the module that owns a layer-scale
  parameter directly (ConvNeXt's ``gamma``). A norm over a concatenation of several
  groups (DenseNet) is an alias of none of them. So every FQN names at most one group
  in a model, and ``widen(model, {alias: width})`` is unambiguous.
* **growable** is ``False`` only for a hidden group that an op pins (an unknown custom
  op, a sort along the channel axis); ``note`` then names the op. Groups that may grow
  only under a rule (LayerNorm, GroupNorm, grouped conv) are growable, and ``note``
  names the rule.
* Every builder returns a model in train mode; ``batchnorm=True`` marks the cases with
  BatchNorm, which tests run in both train and eval mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ZOO", "ExpectedGroup", "ZooCase", "by_name", "feature_width"]


@dataclass(frozen=True)
class ExpectedGroup:
    """A hidden width group as derived by hand (see the module docstring)."""

    name: str
    size: int
    growable: bool
    aliases: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class ZooCase:
    """A model of the zoo: how to build it, an example input and its expected groups."""

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[Tensor, ...]]
    expected: tuple[ExpectedGroup, ...]
    batchnorm: bool = False
    note: str = ""

    def group(self, name: str) -> ExpectedGroup:
        """The expected group called ``name`` (or with ``name`` among its aliases)."""
        for g in self.expected:
            if name == g.name or name in g.aliases:
                return g
        raise KeyError(f"zoo case {self.name!r} has no group {name!r}")


# ------------------------------------------------------------------------------ helpers
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _seeded(seed: int) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Build under a forked global RNG seeded with ``seed``; randomise norms; float64.

    The global RNG is forked so that building a zoo model never changes the random state
    of the caller. Norm affine parameters and BatchNorm running statistics are drawn at
    random (from a generator seeded with ``seed``) so that eval mode is not the identity.
    """

    def wrap(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        @functools.wraps(make)
        def build() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = make()
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for module in model.modules():
                    if not isinstance(module, _NORMS):
                        continue
                    if getattr(module, "weight", None) is not None:
                        module.weight.uniform_(0.5, 1.5, generator=gen)
                        module.bias.normal_(0.0, 0.2, generator=gen)
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        if module.running_mean is not None and module.running_var is not None:
                            module.running_mean.normal_(0.0, 0.2, generator=gen)
                            module.running_var.uniform_(0.5, 1.5, generator=gen)
            return model.to(torch.float64).train()

        return build

    return wrap


def _inputs(*shape: int, seed: int = 0) -> Callable[[], tuple[Tensor, ...]]:
    def make() -> tuple[Tensor, ...]:
        gen = torch.Generator().manual_seed(1000 + seed)
        return (torch.randn(*shape, generator=gen, dtype=torch.float64),)

    return make


def _head(channels: int, dims: int = 2, out: int = 2) -> nn.Sequential:
    """Global average pool, flatten, Linear: the usual CNN classifier head."""
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims]
    return nn.Sequential(pool(1), nn.Flatten(), nn.Linear(channels, out))


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


def feature_width(module: nn.Module) -> int:
    """The size of the output feature axis a module writes (for bookkeeping checks).

    Read from the module's own shape attributes where it has them; for any other
    module, the length of its first direct parameter (a layer-scale vector).
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    own = list(module.parameters(recurse=False))
    if not own:
        raise ValueError(f"{type(module).__name__} has no parameter of its own")
    return own[0].shape[0]


# ------------------------------------------------------------------------------ MLPs
class MLP(nn.Module):
    """A plain MLP with its own forward and functional activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class ResidualMLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class ResidualMLP(nn.Module):
    """Stem Linear, two residual blocks x + f(x), head Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(3, 5)
        self.blocks = nn.ModuleList([ResidualMLPBlock(5, 6), ResidualMLPBlock(5, 4)])
        self.fc_out = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc_in(x)
        for block in self.blocks:
            h = block(h)
        return self.fc_out(h)


class SkipSequential(nn.Sequential):
    """A subclass of nn.Sequential whose forward adds a skip around its middle Linear."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        h = self[1](self[0](x))
        h = h + self[3](self[2](h))
        return self[4](h)


# ------------------------------------------------------------------------------ CNNs
class ConvStack(nn.Module):
    """Conv + BatchNorm + ReLU twice, then a pooled Linear head, in 1, 2 or 3 dims."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.features = nn.Sequential(
            conv(2, 4, 3, padding=1), bn(4), nn.ReLU(), conv(4, 5, 3, padding=1), bn(5), nn.ReLU()
        )
        self.head = _head(5, dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (projection shortcut after the main path)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()  # reused twice, as in torchvision
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet/ResNeXt Bottleneck (1x1, 3x3 with ``groups``, 1x1)."""

    def __init__(self, cin: int, width: int, cout: int, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem, residual stages and a pooled Linear head (torchvision's FQN layout)."""

    def __init__(self, stem_out: int, layers: list[nn.Module], head_in: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_out)
        self.relu = nn.ReLU()
        for i, layer in enumerate(layers, start=1):
            self.add_module(f"layer{i}", layer)
        self.n_layers = len(layers)
        self.head = _head(head_in)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.n_layers + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.head(x)


class DenseLayer(nn.Module):
    """DenseNet's BN-ReLU-Conv layer; returns only its new ``growth`` channels."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.relu(self.norm(x)))


class DenseNet(nn.Module):
    """Stem, a dense block of two layers (each reads the concat of all before), head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(4)
        self.layer1 = DenseLayer(4, 3)
        self.layer2 = DenseLayer(7, 2)
        self.norm5 = nn.BatchNorm2d(9)
        self.head = _head(9)

    def forward(self, x: Tensor) -> Tensor:
        features = [torch.relu(self.norm0(self.conv0(x)))]
        for layer in (self.layer1, self.layer2):
            features.append(layer(torch.cat(features, dim=1)))
        return self.head(torch.relu(self.norm5(torch.cat(features, dim=1))))


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1, depthwise 3x3 (groups=channels), linear project 1x1, +x."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.relu6(self.expand_bn(self.expand(x)))
        h = nn.functional.relu6(self.dw_bn(self.dw(h)))
        return x + self.project_bn(self.project(h))


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 4)
        self.blocks = nn.Sequential(InvertedResidual(4, 8), InvertedResidual(4, 6))
        self.head = _head(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class ResNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 4)
        self.block = Bottleneck(4, 4, 8, groups=2)
        self.head = _head(8)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)))


class SqueezeExcitation(nn.Module):
    """torchvision's SE gate: x * sigmoid(fc2(relu(fc1(avgpool(x))))), 1x1 convs."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.avgpool(x)))))
        return x * scale


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 6)
        self.se = SqueezeExcitation(6, 3)
        self.head = _head(6)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.se(self.stem(x)))


class ConvNeXtBlock(nn.Module):
    """torchvision's CNBlock: dw 7x7, LayerNorm over channels (channels-last), MLP,
    layer scale ``gamma`` owned by the block itself, residual."""

    def __init__(self, dim: int, gamma: Tensor) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(gamma)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 2, stride=2)
        # Layer scale is random (not 1e-6) so the branch matters in the tests.
        self.block = ConvNeXtBlock(4, 0.5 + torch.rand(4))
        self.head = _head(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.gn2 = nn.GroupNorm(3, 6)
        self.head = _head(6)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.gn1(self.conv1(x)))
        return self.head(torch.relu(self.gn2(self.conv2(x))))


# ------------------------------------------------------------------ ops that pin a group
@functools.cache
def _roll_channels_op() -> Callable[[Tensor], Tensor]:
    """A ``torch.library`` custom op no tracer knows: rolls the channel axis by one.

    Growing its input axis would move which channel lands where, so any group that
    reaches it must stay rigid. Registered once per process, on first use.
    """
    try:
        return torch.ops.torch_embed_zoo.roll_channels  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("torch_embed_zoo::roll_channels", mutates_args=())
    def roll_channels(x: Tensor) -> Tensor:
        return torch.roll(x, 1, dims=1)

    @roll_channels.register_fake
    def _(x: Tensor) -> Tensor:
        return torch.empty_like(x)

    def backward(ctx: object, grad: Tensor) -> Tensor:
        return torch.roll(grad, -1, dims=1)

    roll_channels.register_autograd(backward)
    return torch.ops.torch_embed_zoo.roll_channels  # type: ignore[no-any-return]


class RollMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 4)
        self.fc3 = nn.Linear(4, 2)
        self.roll = _roll_channels_op()

    def forward(self, x: Tensor) -> Tensor:
        h = self.roll(torch.relu(self.fc1(x)))
        return self.fc3(torch.tanh(self.fc2(h)))


class SortMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 4)
        self.fc3 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.sort(torch.tanh(self.fc1(x)), dim=1).values
        return self.fc3(torch.relu(self.fc2(h)))


# ------------------------------------------------------------------------------ the zoo
G = ExpectedGroup


def _reused_relu() -> nn.Module:
    act = nn.ReLU()  # one instance at indices 1 and 3
    return nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 4), act, nn.Linear(4, 2))


ZOO: tuple[ZooCase, ...] = (
    ZooCase(
        "mlp_custom_forward",
        _seeded(1)(MLP),
        _inputs(4, 3, seed=1),
        (
            G("fc1", 5, True),  # fc1 rows → relu → fc2 columns
            G("fc2", 6, True),  # fc2 rows → tanh → fc3 columns
        ),
    ),
    ZooCase(
        "mlp_residual",
        _seeded(2)(ResidualMLP),
        _inputs(4, 3, seed=2),
        (
            # the stream: fc_in and both blocks' fc2 unify through the residual adds
            G("fc_in", 5, True, ("blocks.0.fc2", "blocks.1.fc2")),
            G("blocks.0.fc1", 6, True),  # block 0's hidden layer (GELU between)
            G("blocks.1.fc1", 4, True),  # block 1's hidden layer
        ),
    ),
    ZooCase(
        "sequential_nested",
        _seeded(3)(
            lambda: nn.Sequential(
                nn.Sequential(nn.Linear(3, 5), nn.ReLU()),
                nn.Sequential(nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.Linear(4, 2)),
            )
        ),
        _inputs(4, 3, seed=3),
        (
            G("0.0", 5, True),  # 0.0 rows → ReLU → 1.0.0 columns
            G("1.0.0", 4, True),  # 1.0.0 rows → Tanh → 1.1 columns
        ),
    ),
    ZooCase(
        "sequential_reused_relu",
        _seeded(4)(_reused_relu),
        _inputs(4, 3, seed=4),
        (
            G("0", 5, True),  # the shared ReLU is stateless: two separate groups
            G("2", 4, True),
        ),
        note="one nn.ReLU instance at indices 1 and 3 (named_modules lists it once, as '1')",
    ),
    ZooCase(
        "mlp_batchnorm",
        _seeded(5)(
            lambda: nn.Sequential(
                nn.Linear(3, 6),
                nn.BatchNorm1d(6),
                nn.ReLU(),
                nn.Linear(6, 5),
                nn.Tanh(),
                nn.BatchNorm1d(5),
                nn.Linear(5, 2),
            )
        ),
        _inputs(6, 3, seed=5),
        (
            G("0", 6, True, ("1",)),  # BatchNorm before the activation, per channel
            G("3", 5, True, ("5",)),  # BatchNorm after the activation, per channel
        ),
        batchnorm=True,
    ),
    ZooCase(
        "flatten_tokens_linear",
        _seeded(6)(
            lambda: nn.Sequential(
                nn.Linear(3, 4),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(8, 5),
                nn.Tanh(),
                nn.Linear(5, 2),
            )
        ),
        _inputs(4, 2, 3, seed=6),
        (
            # Linear on 2 tokens, then Flatten: feature f of token t is column 4t+f of
            # '3' (the feature is the minor axis of the merge)
            G("0", 4, True, note="flatten merges (2 tokens, 4 features)"),
            G("3", 5, True),
        ),
        note="input (N, 2, 3): the first Linear acts per token",
    ),
    *(
        ZooCase(
            f"conv{d}d_bn",
            _seeded(10 + d)(functools.partial(ConvStack, d)),
            _inputs(3, 2, *([5] * d), seed=10 + d),
            (
                G("features.0", 4, True, ("features.1",)),  # conv → BN → ReLU → conv
                G("features.3", 5, True, ("features.4",)),  # conv → BN → ReLU → pool → fc
            ),
            batchnorm=True,
        )
        for d in (1, 2, 3)
    ),
    ZooCase(
        "conv_flatten_linear",
        _seeded(14)(
            lambda: nn.Sequential(
                nn.Conv2d(1, 3, 3),
                nn.ReLU(),
                nn.Conv2d(3, 4, 2),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(16, 5),
                nn.ReLU(),
                nn.Linear(5, 2),
            )
        ),
        _inputs(3, 1, 5, 5, seed=14),
        (
            G("0", 3, True),  # conv → ReLU → conv
            # 2x2 output map: channel c owns the 4 consecutive columns 4c..4c+3 of '5'
            G("2", 4, True, note="flatten: each channel owns H·W = 4 consecutive inputs"),
            G("5", 5, True),
        ),
    ),
    ZooCase(
        "resnet_basic",
        _seeded(15)(
            lambda: ResNet(
                4,
                [
                    nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 4)),
                    nn.Sequential(BasicBlock(4, 6, stride=2), BasicBlock(6, 6)),
                ],
                6,
            )
        ),
        _inputs(2, 3, 6, 6, seed=15),
        (
            # stage 1: the stem and every block's conv2/bn2 unify through identity adds
            G(
                "conv1",
                4,
                True,
                ("bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.conv2", "layer1.1.bn2"),
            ),
            G("layer1.0.conv1", 4, True, ("layer1.0.bn1",)),  # inside block 1.0
            G("layer1.1.conv1", 4, True, ("layer1.1.bn1",)),
            G("layer2.0.conv1", 6, True, ("layer2.0.bn1",)),
            # stage 2: block 2.0's main path (written before its shortcut in forward
            # order), the projection shortcut and block 2.1's conv2/bn2 via the adds
            G(
                "layer2.0.conv2",
                6,
                True,
                (
                    "layer2.0.bn2",
                    "layer2.0.downsample.0",
                    "layer2.0.downsample.1",
                    "layer2.1.conv2",
                    "layer2.1.bn2",
                ),
            ),
            G("layer2.1.conv1", 6, True, ("layer2.1.bn1",)),
        ),
        batchnorm=True,
    ),
    ZooCase(
        "resnet_bottleneck",
        _seeded(16)(
            lambda: ResNet(4, [nn.Sequential(Bottleneck(4, 3, 8), Bottleneck(8, 3, 8))], 8)
        ),
        _inputs(2, 3, 5, 5, seed=16),
        (
            # stem: read by block 1.0's conv1 and its projection shortcut only
            G("conv1", 4, True, ("bn1",)),
            G("layer1.0.conv1", 3, True, ("layer1.0.bn1",)),
            G("layer1.0.conv2", 3, True, ("layer1.0.bn2",)),
            # the stage: conv3/bn3 of both blocks and the projection unify via the adds
            G(
                "layer1.0.conv3",
                8,
                True,
                (
                    "layer1.0.bn3",
                    "layer1.0.downsample.0",
                    "layer1.0.downsample.1",
                    "layer1.1.conv3",
                    "layer1.1.bn3",
                ),
            ),
            G("layer1.1.conv1", 3, True, ("layer1.1.bn1",)),
            G("layer1.1.conv2", 3, True, ("layer1.1.bn2",)),
        ),
        batchnorm=True,
    ),
    ZooCase(
        "densenet_block",
        _seeded(17)(DenseNet),
        _inputs(2, 3, 5, 5, seed=17),
        (
            # the stem's 4 channels: norm0, and layer1.norm (which reads them alone)
            G("conv0", 4, True, ("norm0", "layer1.norm")),
            # layer1's growth: channels 4..6 of layer2's input and of norm5's
            G("layer1.conv", 3, True, note="cat: offset 4 in layer2.norm and norm5"),
            # layer2's growth: channels 7..8 of norm5 (layer2.norm spans two groups)
            G("layer2.conv", 2, True, note="cat: offset 7 in norm5"),
        ),
        batchnorm=True,
    ),
    ZooCase(
        "mobilenetv2_inverted_residual",
        _seeded(18)(MobileNetV2),
        _inputs(2, 3, 5, 5, seed=18),
        (
            # the stream: stem and both blocks' linear projections via the adds
            G(
                "stem.0",
                4,
                True,
                (
                    "stem.1",
                    "blocks.0.project",
                    "blocks.0.project_bn",
                    "blocks.1.project",
                    "blocks.1.project_bn",
                ),
            ),
            # expansion: the depthwise conv maps channel i to channel i (groups += n)
            G(
                "blocks.0.expand",
                8,
                True,
                ("blocks.0.expand_bn", "blocks.0.dw", "blocks.0.dw_bn"),
                note="depthwise conv blocks.0.dw: groups grow with the channels",
            ),
            G(
                "blocks.1.expand",
                6,
                True,
                ("blocks.1.expand_bn", "blocks.1.dw", "blocks.1.dw_bn"),
                note="depthwise conv blocks.1.dw: groups grow with the channels",
            ),
        ),
        batchnorm=True,
    ),
    ZooCase(
        "resnext_grouped_conv",
        _seeded(19)(ResNeXt),
        _inputs(2, 3, 5, 5, seed=19),
        (
            G("stem.0", 4, True, ("stem.1",)),  # read by block.conv1 and the shortcut
            # input of the grouped conv: each of its 2 groups grows by the same amount
            G("block.conv1", 4, True, ("block.bn1",), note="grouped conv input (groups=2)"),
            # output of the grouped conv: copies stay in their source's group segment
            G("block.conv2", 4, True, ("block.bn2",), note="grouped conv output (groups=2)"),
            G(
                "block.conv3",
                8,
                True,
                ("block.bn3", "block.downsample.0", "block.downsample.1"),
            ),  # main path and projection shortcut unify through the add
        ),
        batchnorm=True,
    ),
    ZooCase(
        "squeeze_excitation",
        _seeded(20)(SENet),
        _inputs(2, 3, 5, 5, seed=20),
        (
            # the gate x * sigmoid(fc2(...)) unifies fc2's rows with the stem's channels
            G("stem.0", 6, True, ("stem.1", "se.fc2")),
            G("se.fc1", 3, True),  # the squeeze: fc1 rows → ReLU → fc2 columns
        ),
        batchnorm=True,
    ),
    ZooCase(
        "groupnorm",
        _seeded(21)(GroupNormNet),
        _inputs(2, 3, 5, 5, seed=21),
        (
            G("conv1", 8, True, ("gn1",), note="GroupNorm(2 groups of 4)"),
            G("conv2", 6, True, ("gn2",), note="GroupNorm(3 groups of 2)"),
        ),
    ),
    ZooCase(
        "convnext_block",
        _seeded(22)(ConvNeXt),
        _inputs(2, 3, 6, 6, seed=22),
        (
            # the stream: stem, depthwise conv (channel-wise), LayerNorm over channels,
            # pwconv2 rows and layer scale (owned by the block), unified by the add
            G(
                "stem",
                4,
                True,
                ("block.dwconv", "block.norm", "block.pwconv2", "block"),
                note="LayerNorm block.norm over the group; depthwise conv block.dwconv",
            ),
            G("block.pwconv1", 16, True),  # the inverted bottleneck 4·dim, GELU between
        ),
        note=(
            "the block owns its layer-scale Parameter 'gamma' directly (torchvision CNBlock): "
            "its shape is its only size, so widening needs no handler"
        ),
    ),
    ZooCase(
        "sequential_subclass_residual",
        _seeded(23)(
            lambda: SkipSequential(
                nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)
            )
        ),
        _inputs(4, 3, seed=23),
        (
            # the overridden forward adds a skip: '0' and '2' write one group
            G("0", 5, True, ("2",)),
        ),
        note="an nn.Sequential subclass whose forward differs from Sequential's",
    ),
    ZooCase(
        "unknown_custom_op",
        _seeded(24)(RollMLP),
        _inputs(4, 3, seed=24),
        (
            # fc1's rows reach torch_embed_zoo::roll_channels, which no tracer knows
            G("fc1", 5, False, note="custom op torch_embed_zoo::roll_channels"),
            G("fc2", 4, True),  # after the op: fc2 rows → tanh → fc3 columns
        ),
        note="the op's output axis has no parameterised producer, so it is not listed",
    ),
    ZooCase(
        "channel_sort",
        _seeded(25)(SortMLP),
        _inputs(4, 3, seed=25),
        (
            G("fc1", 5, False, note="torch.sort along the feature axis"),
            G("fc2", 4, True),
        ),
        note="the sort's output axis has no parameterised producer, so it is not listed",
    ),
)


def by_name(name: str) -> ZooCase:
    """The zoo case called ``name``; ``KeyError`` listing the names otherwise."""
    for case in ZOO:
        if case.name == name:
            return case
    raise KeyError(f"no zoo case {name!r}; the zoo has {[c.name for c in ZOO]}")
