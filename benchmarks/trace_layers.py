"""A decode step's layers on a timeline, from the Chrome traces of ``profile_decode.py --trace-dir``.

With PDL a kernel's own duration includes the time it waits for the one before it, so the profile's per-kernel
sums overstate what each costs.  This reads the kernels of one trace, cuts the busiest stream into layers at an
anchor kernel that runs once a layer (default ``_qk_norm_rope_kernel``) and, for every position in the layer
(the j-th kernel after the anchor), gives its name, its median duration, the median gap from the previous kernel's
end to its start (negative: it started early, under PDL) and its median *exposed* time: its end minus the previous
kernel's end, what it adds to the stream's critical path.  The exposed times of a layer sum to its period.
Kernels of other streams (the LoRA side stream) are listed per layer by where they start and end relative to
the anchor.  Given two traces (``--base``), a column of the exposed-time differences per position shows where a
switch gained or lost.

    python benchmarks/trace_layers.py TRACE.json [--base BASE.json] [--anchor NAME] [--out table.md]

Layers whose kernel names differ from the most common sequence (the first and the last, around the LM head and
the sampler) are left out and counted.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.kernels.bench_timing import emit  # noqa: E402


@dataclass(frozen=True)
class Kernel:
    name: str
    start: float  # us
    dur: float  # us
    stream: int

    @property
    def end(self) -> float:
        return self.start + self.dur


def load_kernels(path: str) -> list[Kernel]:
    """The GPU kernels of a Chrome trace (``ph`` X, ``cat`` kernel), in start order."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    out = [Kernel(e["name"], float(e["ts"]), float(e.get("dur", 0.0)), int(e.get("args", {}).get("stream", 0)))
           for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    return sorted(out, key=lambda k: k.start)


def main_stream(kernels: list[Kernel]) -> int:
    """The stream with the most kernel time."""
    busy: Counter = Counter()
    for k in kernels:
        busy[k.stream] += k.dur
    if not busy:
        raise ValueError("the trace has no GPU kernels")
    return busy.most_common(1)[0][0]


def short(name: str, width: int = 48) -> str:
    """A kernel name without its template arguments / parameter list, at most ``width`` characters."""
    for cut in ("(", "<"):
        if cut in name:
            name = name[:name.index(cut)]
    return name if len(name) <= width else name[:width - 3] + "..."


@dataclass
class Layers:
    names: list[str]  # the common sequence of kernel names, anchor first
    layers: list[list[Kernel]]  # the main-stream kernels of every layer that follows it
    skipped: int  # layers whose sequence differs
    periods: list[float]  # each kept layer's period: the next anchor's end minus this one's
    side: list[list[Kernel]]  # per kept layer, the other streams' kernels that start within it


def split_layers(kernels: list[Kernel], anchor: str, stream: Optional[int] = None) -> Layers:
    """The busiest stream (or ``stream``) cut at each kernel whose name contains ``anchor``."""
    stream = main_stream(kernels) if stream is None else stream
    main = [k for k in kernels if k.stream == stream]
    cuts = [i for i, k in enumerate(main) if anchor in k.name]
    if len(cuts) < 2:
        raise ValueError(f"anchor {anchor!r} found {len(cuts)} times on stream {stream}: need two or more")
    spans = [main[a:b] for a, b in zip(cuts, cuts[1:])]
    common = Counter(tuple(short(k.name) for k in s) for s in spans).most_common(1)[0][0]
    kept, periods, side = [], [], []
    others = [k for k in kernels if k.stream != stream]
    for i, s in enumerate(spans):
        if tuple(short(k.name) for k in s) != common:
            continue
        kept.append(s)
        nxt = main[cuts[i + 1]]
        periods.append(nxt.end - s[0].end)
        side.append([k for k in others if s[0].start <= k.start < nxt.start])
    return Layers(list(common), kept, len(spans) - len(kept), periods, side)


def position_stats(layers: Layers) -> list[dict]:
    """Per position: name, median duration, median gap (start minus the previous kernel's end) and median exposed
    time (end minus the previous kernel's end); the anchor's previous kernel is the last one of its layer's
    predecessor, so position 0 has no gap or exposed time of its own when it is the first kept layer."""
    rows = []
    for j, name in enumerate(layers.names):
        durs, gaps, exposed = [], [], []
        for i, layer in enumerate(layers.layers):
            k = layer[j]
            prev = layer[j - 1] if j > 0 else None
            durs.append(k.dur)
            if prev is not None:
                gaps.append(k.start - prev.end)
                exposed.append(k.end - prev.end)
        rows.append(dict(name=name, dur=statistics.median(durs), gap=statistics.median(gaps) if gaps else None,
                         exposed=statistics.median(exposed) if exposed else None))
    # the anchor's exposed time: the period minus what the other positions expose
    if rows and layers.periods:
        rows[0]["exposed"] = statistics.median(layers.periods) - sum(r["exposed"] or 0.0 for r in rows[1:])
    return rows


def side_stats(layers: Layers) -> list[dict]:
    """The other streams' kernels by their order within a layer: name, median start and end relative to the
    anchor's start, median duration (layers with a different number of side kernels are left out)."""
    if not layers.side:
        return []
    count = Counter(len(s) for s in layers.side).most_common(1)[0][0]
    same = [(layer, s) for layer, s in zip(layers.layers, layers.side) if len(s) == count]
    rows = []
    for j in range(count):
        rows.append(dict(name=short(same[0][1][j].name), stream=same[0][1][j].stream,
                         start=statistics.median(s[j].start - layer[0].start for layer, s in same),
                         end=statistics.median(s[j].end - layer[0].start for layer, s in same),
                         dur=statistics.median(s[j].dur for _, s in same)))
    return rows


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def report(path: str, anchor: str, base: Optional[str] = None) -> str:
    layers = split_layers(load_kernels(path), anchor)
    rows = position_stats(layers)
    base_rows = None
    if base is not None:
        base_layers = split_layers(load_kernels(base), anchor)
        if base_layers.names == layers.names:
            base_rows = position_stats(base_layers)
    period = statistics.median(layers.periods)
    lines = [f"{path}: {len(layers.layers)} layers kept ({layers.skipped} with another kernel sequence left out), "
             f"{len(layers.names)} main-stream kernels a layer, median period {period:.1f} us"
             + (f" (base {statistics.median(base_layers.periods):.1f} us)" if base is not None else ""), "",
             "| # | kernel | duration (us) | gap (us) | exposed (us) |" + (" base exposed | difference |" if base_rows
                                                                          else ""),
             "|---:|---|---:|---:|---:|" + ("---:|---:|" if base_rows else "")]
    for j, r in enumerate(rows):
        cells = f"| {j} | `{r['name']}` | {_fmt(r['dur'])} | {_fmt(r['gap'])} | {_fmt(r['exposed'])} |"
        if base_rows:
            b = base_rows[j]["exposed"]
            cells += f" {_fmt(b)} | {_fmt(None if b is None or r['exposed'] is None else r['exposed'] - b)} |"
        lines.append(cells)
    if base is not None and base_rows is None:
        lines += ["", "(the base trace's layer has another kernel sequence: no per-position comparison)"]
    side = side_stats(layers)
    if side:
        lines += ["", "Other streams, per layer (us from the anchor's start):", "",
                  "| kernel | stream | start | end | duration |", "|---|---:|---:|---:|---:|"]
        lines += [f"| `{s['name']}` | {s['stream']} | {s['start']:.1f} | {s['end']:.1f} | {s['dur']:.1f} |"
                  for s in side]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--base", default=None, help="a second trace (e.g. the switch off) to compare with, per position")
    p.add_argument("--anchor", default="_qk_norm_rope_kernel", help="a kernel that runs once a layer")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    emit(report(a.trace, a.anchor, a.base), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
