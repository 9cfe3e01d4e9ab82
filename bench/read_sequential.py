"""Time read_sequential: a traced read (first call per structure) and a cached one.

``read_sequential`` derives an MLP's Layout from its traced width groups and caches it
per structure (names, types and tensor shapes of the modules); every call still walks
the modules for the per-module checks. This script times, on a 784-1000-1000-10 and a
1-50-1 ReLU MLP (float32, CPU): the walk alone (the baseline: what every call pays),
a read with the cache cleared (walk + fx trace + groups + Layout) and a cached read,
and prints both against the walk.

Usage::

    python bench/read_sequential.py            # 20 repeats (best), 2000 cached calls
    python bench/read_sequential.py --quick    # 3 repeats, 200 cached calls
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from collections.abc import Callable

import torch
from torch import nn

from torch_embed import _sequential
from torch_embed._sequential import _check_children, read_sequential


def mlp(dims: tuple[int, ...]) -> nn.Sequential:
    """A ReLU MLP of the given widths."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def best(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _traced_read(net: nn.Sequential) -> None:
    _sequential._CACHE.clear()
    read_sequential(net)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, calls = (3, 200) if args.quick else (20, 2000)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, best of {repeats}; cached: mean of {calls}")
    for dims in ((784, 1000, 1000, 10), (1, 50, 1)):
        net = mlp(dims)
        children = [(n, c) for n, c in net._modules.items() if c is not None]
        walk = best(functools.partial(_check_children, net, children), repeats * 10)
        first = best(functools.partial(_traced_read, net), repeats)
        read_sequential(net)
        t = time.perf_counter()
        for _ in range(calls):
            read_sequential(net)
        cached = (time.perf_counter() - t) / calls
        name = "-".join(map(str, dims))
        print(
            f"{name:>16}: walk {walk * 1e3:.3f} ms | traced read {first * 1e3:.3f} ms "
            f"({first / walk:.0f}x walk) | cached read {cached * 1e3:.3f} ms "
            f"({cached / walk:.2f}x walk)"
        )


if __name__ == "__main__":
    main()
