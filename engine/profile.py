"""Profiler traces of a few train steps, and what they say in a few lines.

`jax.profiler.trace(run_dir)` writes `run_dir/plugins/profile/<time>/<host>.xplane.pb`, which
TensorBoard's profile tab (and xprof / Perfetto) opens next to the run's scalars. `summarize`
reads the same file with `jax.profiler.ProfileData` and answers the first two questions of any
speed work without a UI: how much of each step the device was busy (the rest is host overhead,
data waits or launch gaps), and which ops took the time.
"""

from __future__ import annotations

import collections
import glob
import os
import re

import jax

# A device plane's timelines, best first: per-HLO-op events where the backend writes them,
# else the raw kernels of its streams.
_DEVICE_TIMELINES = (
    ("XLA ops", lambda line: line == "XLA Ops"),
    ("kernels", lambda line: line.startswith("Stream")),
)
# The CPU backend runs thunks on its client's and its Eigen pool's threads, under executor
# events that only wait.
_CPU_LINE_PREFIX = "tf_XLA"
_MARKERS = ("ThreadpoolListener", "end: ")
_HOST = "XLA thunks on the host"
# A matmul XLA:CPU hands to Eigen (a weight gradient contracting the token rows, batched
# attention dots): its thunk returns once Eigen's threads have the work, untraced (a 2.1 GFLOP
# one alone on 2 cores: a 1.1 ms event in a 12.6 ms call, benchmarks/RESULTS.md 2026-11-27).
_EIGEN_DOT = re.compile(r"dot(_general)?(\.\d+)?$")


def latest_trace(log_dir: str) -> str | None:
    """The newest xplane.pb that `jax.profiler.trace(log_dir)` wrote, or None."""
    files = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb"))
    return max(files, key=os.path.getmtime) if files else None


def _leaves(line) -> list:
    """The line's events that contain no other (a while loop's body ops, not the loop). Events
    that only overlap all count: GPU kernels may start before the one ahead of them ends."""
    events = sorted(
        (e for e in line.events if e.duration_ns > 0 and not e.name.startswith(_MARKERS)),
        key=lambda e: (e.start_ns, -e.duration_ns),
    )
    leaves = []
    for i, e in enumerate(events):
        end = e.start_ns + e.duration_ns
        j = i + 1
        while j < len(events) and events[j].start_ns < end:
            if events[j].start_ns + events[j].duration_ns <= end:
                break  # e holds events[j]
            j += 1
        else:
            leaves.append(e)
    return leaves


def _timelines(data) -> tuple[str, list]:
    """(where, op events) of the first device with an op timeline; of the host's XLA threads
    on CPU, where virtual devices share the threads."""
    devices = [p for p in data.planes if p.name.startswith("/device:")]
    # GPU:0 / TPU:0 before other device planes (e.g. a custom one with no op timeline).
    devices.sort(key=lambda p: ("GPU" not in p.name and "TPU" not in p.name, p.name))
    for plane in devices:
        for what, wanted in _DEVICE_TIMELINES:
            events = [e for line in plane.lines if wanted(line.name) for e in _leaves(line)]
            if events:
                return f"{what} on {plane.name}", events
    events = [
        e
        for plane in data.planes
        if plane.name == "/host:CPU"
        for line in plane.lines
        if line.name.startswith(_CPU_LINE_PREFIX)
        for e in _leaves(line)
        if not e.name.startswith("ThunkExecutor")
    ]
    return _HOST, events


def _busy_ns(events) -> float:
    """Length of the union of the events' intervals: time with at least one op running."""
    busy, end = 0.0, -1.0
    for e in sorted(events, key=lambda e: e.start_ns):
        start, stop = e.start_ns, e.start_ns + e.duration_ns
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def summarize(trace_file: str, steps: int, step_s: float, top: int = 12) -> list[str]:
    """Lines: device busy share of `steps` steps of `step_s` seconds, then the `top` ops by time.

    Op names are the compiled program's (fusion.12, custom-call.3, ...): look them up in the
    TensorBoard profile or an XLA dump. A scanned layer's ops repeat once per layer, so their
    time is summed over layers."""
    where, events = _timelines(jax.profiler.ProfileData.from_file(trace_file))
    if not events:
        return [f"profile {trace_file}: no op events found"]
    return _table(where, events, trace_file, steps, step_s, top)


def _table(where: str, events, trace_file: str, steps: int, step_s: float, top: int) -> list[str]:
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        total[e.name] += e.duration_ns
        count[e.name] += 1
    step_ns = step_s * 1e9
    busy = _busy_ns(events) / steps
    lines = [
        f"profile ({where}, {steps} steps, {trace_file}): busy {busy / 1e6:.1f} of "
        f"{step_ns / 1e6:.1f} ms per step ({busy / step_ns:.1%}); top ops by time per step:",
        f"{'ms/step':>9} {'share':>6} {'calls':>6}  op",
    ]
    for name, ns in total.most_common(top):
        lines.append(
            f"{ns / steps / 1e6:9.2f} {ns / steps / step_ns:6.1%} {count[name] // steps:6d}  "
            f"{name[:90]}"
        )
    if where == _HOST and any(_EIGEN_DOT.match(name) for name in total):
        lines.append(
            "note: the host's dot thunks (Eigen matmuls) are timed at their launch only: their "
            "work runs on Eigen's threads, in neither the rows nor the busy share"
        )
    return lines


class StepTrace:
    """Traces steps `first` .. `first + count - 1` (1-based) of a training loop into `log_dir`;
    first = 0: traces nothing."""

    def __init__(self, log_dir: str, first: int, count: int):
        self.log_dir, self.first, self.last = log_dir, first, first + count - 1
        self.active, self.seconds = False, []

    def annotate(self, step: int):
        """Context for one step: starts the trace at `first`, marks the step for TensorBoard."""
        if step == self.first:
            jax.profiler.start_trace(self.log_dir)
            self.active = True
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def finish(self, step: int, step_s: float) -> list[str]:
        """After a step has completed: at `last`, stops the trace and returns its summary."""
        if not self.active:
            return []
        self.seconds.append(step_s)
        if step < self.last:
            return []
        self.close()
        trace = latest_trace(self.log_dir)
        if trace is None:
            return [f"profile: no trace written under {self.log_dir}"]
        return summarize(trace, len(self.seconds), sum(self.seconds) / len(self.seconds))

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
