"""Widen a ResNet-50-shaped network ×1.5 in every growable group: time and memory.

The model is ``bench/width_groups.py``'s ``resnet50_shaped()`` (random init, float32,
eval mode; 25.6 M parameters). Reported, best of ``--repeat`` runs, each on a fresh copy:

* ``trace``: ``width_groups`` alone (torch.export; torch's work, reported apart);
* ``plan``: ``plan_groups`` (the per-group maps and per-axis gathers);
* ``apply``: ``GroupEmbedding.apply`` on the state (every new tensor computed);
* ``widen``: the whole ``torch_embed.widen(model, 1.5, example_inputs=x)``: trace, plan,
  apply, swap in, handlers, and the two forward passes of the output check;
* ``bound``: the allocate-and-copy bound, measured in the same run: allocate every new
  tensor and write it once (a copy of a tensor of its size), all kept alive as the
  apply keeps them (as ``bench/widen.py`` measures it: the fresh pages are part of
  the cost);
* ``copy``: the same copies with each tensor freed at once (the bound's definition
  before 2026-12-05: the allocator then hands the same pages back, so no page is
  touched for the first time; a floor that no apply keeping its results can reach);

Times are wall seconds and, in brackets, process CPU seconds (user + system, less
disturbed by other processes on a shared machine); the ratios use CPU time.
* memory: the size of the new tensors, and the process's peak RSS growth during
  ``widen`` (sampled every millisecond in a fresh subprocess).

Usage::

    python bench/widen_graph.py            # 3 repeats, input 1x3x64x64
    python bench/widen_graph.py --quick    # 1 repeat
"""

from __future__ import annotations

import argparse
import copy
import resource
import subprocess
import sys
import threading
import time

import torch
from _common import write_results
from torch import Tensor
from width_groups import resnet50_shaped

import torch_embed
from torch_embed.graph.groups import width_groups
from torch_embed.graph.plan import plan_groups


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def _memory(size: int) -> None:
    """Child process: print the new tensors' size and the peak RSS growth of one widen.

    RSS is sampled every millisecond by a thread while ``widen`` runs.
    """
    model = resnet50_shaped()
    x = torch.randn(1, 3, size, size)
    torch_embed.width_groups(model, x)  # torch's one-off export setup, outside the window
    before = _rss_kib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    emb = torch_embed.widen(model, 1.5, "split", example_inputs=x)
    done.set()
    sampler.join()
    new = sum(
        t.numel() * t.element_size() for n, t in model.state_dict().items() if n in emb.tensors
    )
    print(f"{new} {(peak[0] - before) * 1024}")


def _bound(new: dict[str, Tensor], keep: bool) -> tuple[float, float]:
    """Allocate every new tensor and write it once (a copy of the same size).

    ``keep``: all stay alive until the end (as the apply's results do); otherwise each
    is freed at once. Returns (wall, CPU) seconds.
    """
    kept = []
    t, c = time.perf_counter(), time.process_time()
    for w in new.values():
        out = torch.empty(w.shape, dtype=w.dtype).copy_(w)
        if keep:
            kept.append(out)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--write", action="store_true", help="record in bench/RESULTS.md")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory(args.size)
        return
    lines: list[str] = []

    def say(line: str) -> None:
        print(line)
        lines.append(line)

    base = resnet50_shaped()
    x = torch.randn(1, 3, args.size, args.size)
    say(f"ResNet-50-shaped, {sum(p.numel() for p in base.parameters()) / 1e6:.1f} M params")
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {tuple(x.shape)}")
    width_groups(base, x)  # torch's one-off export setup
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    for _ in range(1 if args.quick else 3):
        model = copy.deepcopy(base)
        t0 = clock()
        groups = width_groups(model, x)
        t1 = clock()
        emb = plan_groups(groups, 1.5, "split")
        t2 = clock()
        state = {n: t.detach() for n, t in model.state_dict().items() if n in emb.tensors}
        with torch.no_grad():
            new = emb.apply(state)
        t3 = clock()
        wide = {n: new[n] for n in emb.tensors}
        del new, state
        bound = _bound(wide, keep=True)
        only_copy = _bound(wide, keep=False)
        del wide
        t4 = clock()
        torch_embed.widen(model, 1.5, "split", example_inputs=x)
        t5 = clock()
        runs = {
            "trace": (t1[0] - t0[0], t1[1] - t0[1]),
            "plan": (t2[0] - t1[0], t2[1] - t1[1]),
            "apply": (t3[0] - t2[0], t3[1] - t2[1]),
            "bound": bound,
            "copy": only_copy,
            "widen": (t5[0] - t4[0], t5[1] - t4[1]),
        }
        for k, (w, c) in runs.items():
            best[k] = min(best.get(k, float("inf")), w)
            cpu[k] = min(cpu.get(k, float("inf")), c)
    say(f"groups grown: {len(emb.sizes)}; tensors reshaped: {len(emb.tensors)}")
    for k in ("trace", "plan", "apply", "bound", "copy", "widen"):
        say(f"{k:6s} {best[k]:8.3f} s  (cpu {cpu[k]:.3f} s)")
    wall = best["apply"] / best["bound"]
    say(f"apply / bound: {cpu['apply'] / cpu['bound']:.2f} (cpu), {wall:.2f} (wall)")
    say(f"apply / copy: {cpu['apply'] / cpu['copy']:.2f} (cpu)")
    say(f"(plan + apply) / bound: {(cpu['plan'] + cpu['apply']) / cpu['bound']:.2f} (cpu)")
    say(f"(widen - trace) / bound: {(cpu['widen'] - cpu['trace']) / cpu['bound']:.2f} (cpu)")
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", "--size", str(args.size)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    new_b, grew_b = (int(v) for v in out)
    say(f"new tensors: {new_b / 2**20:.1f} MiB")
    say(
        f"peak RSS growth during widen: {grew_b / 2**20:.1f} MiB = "
        f"{grew_b / new_b:.2f} x the new tensors (the narrow tensors they replace are "
        f"freed only when the call returns)"
    )
    if args.write:
        command = "python bench/widen_graph.py" + (" --quick" if args.quick else "")
        text = f"Command: `{command} --write`\n\n```\n" + "\n".join(lines) + "\n```"
        write_results(text, f"`{command}`", "## bench/widen_graph.py")


if __name__ == "__main__":
    main()
