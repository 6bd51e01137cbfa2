"""Where a profiled CUDA step left the GPU idle, and what the host was doing meanwhile.

A step's wall time is the GPU's busy time plus the time the GPU waited for work: the host had not yet
launched the next kernel. On a GPU, ISOPO's extra time is partly extra kernels and partly such waiting
(BENCHMARKS.md, sessions 11–12), and the profiler's per-operator totals cannot tell which host work caused
the waiting. This module reads the profiler's timeline instead: every interval in which no kernel, copy or
memset ran (a gap), from the step's first host operator to its last device activity, and for each gap

- the host operator that launched the kernel ending it (what the device was waiting for), inside its
  context: the innermost autograd node or ``isopo::`` region around that operator on its thread;
- the ``isopo::`` regions that overlapped the gap in time (``record_function`` scopes around ISOPO's
  per-micro-batch host work: the bookkeeping, the sample draw, the end of the step), on any thread;
- the step's phase the gap fell in: before the first autograd node (forward), up to the last one
  (backward), or after it (ISOPO's ``end_step``, the final synchronisation).

The profiler adds a few µs of host time to every operator, so its gaps are wider than an unprofiled
step's; the split between causes is what to read. Pure functions over plain records, so that they are
tested on a CPU; ``from_profile`` is the one part that needs a CUDA profile.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

REGION_PREFIX = "isopo::"
"""``record_function`` names of ISOPO's host regions (``algorithms.isopo``), reported when a gap overlaps them."""
NODE_PREFIX = "autograd::engine::evaluate_function: "
"""The profiler's name of an autograd node's backward."""
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
"""The device events that occupy the GPU (a ``gpu_user_annotation`` spans a region's kernels and the gaps
between them, so it is not work)."""


@dataclass(frozen=True)
class HostOp:
    """A host-side profiler event: an operator, an autograd node, a ``record_function`` region."""

    name: str
    start: int
    end: int
    thread: int
    id: int
    """The profiler's correlation id, which the kernels it launched link to."""


@dataclass(frozen=True)
class DeviceSpan:
    """A kernel, copy or memset on the device, and the id of the host operator that launched it (0: none)."""

    start: int
    end: int
    launched_by: int
    name: str = ""
    """The kernel's name, or the profiler's for a copy or memset."""


@dataclass(frozen=True)
class Gap:
    start: int
    end: int
    next_span: DeviceSpan
    """The first device activity after the gap."""

    @property
    def length(self) -> int:
        return self.end - self.start


def idle_gaps(spans: list[DeviceSpan], window_start: int) -> list[Gap]:
    """Every interval after ``window_start`` (the step's start) in which the device ran nothing, up to its
    last activity, each with the span that ended it (concurrent spans, on several streams, count once)."""
    ordered = sorted(spans, key=lambda s: s.start)
    gaps = []
    busy_until = window_start
    for s in ordered:
        if s.start > busy_until:
            gaps.append(Gap(busy_until, s.start, s))
        busy_until = max(busy_until, s.end)
    return gaps


class HostTimeline:
    """The host events by thread, for the questions the report asks of them."""

    def __init__(self, ops: list[HostOp]):
        self.by_id = {op.id: op for op in ops if op.id}
        self.parent: dict[int, HostOp | None] = {}
        """id(event) → the innermost event on its thread that contains it."""
        by_thread: dict[int, list[HostOp]] = defaultdict(list)
        for op in ops:
            by_thread[op.thread].append(op)
        for events in by_thread.values():
            stack: list[HostOp] = []
            for e in sorted(events, key=lambda o: (o.start, -o.end)):
                while stack and stack[-1].end < e.end:
                    stack.pop()
                self.parent[id(e)] = stack[-1] if stack else None
                stack.append(e)
        self.regions = sorted((op for op in ops if op.name.startswith(REGION_PREFIX)), key=lambda o: o.start)
        nodes = [op for op in ops if op.name.startswith(NODE_PREFIX)]
        self.backward = (min(o.start for o in nodes), max(o.end for o in nodes)) if nodes else None

    def enclosing(self, op: HostOp) -> list[HostOp]:
        """The events on op's thread that contain it, outermost first (op itself last)."""
        chain = [op]
        while (up := self.parent.get(id(chain[-1]))) is not None:
            chain.append(up)
        return chain[::-1]

    def context(self, op: HostOp) -> str:
        """The innermost autograd node or ISOPO region around op, or its outermost event."""
        chain = self.enclosing(op)
        for e in reversed(chain[:-1]):
            if e.name.startswith(NODE_PREFIX):
                return e.name[len(NODE_PREFIX):]
            if e.name.startswith(REGION_PREFIX):
                return e.name
        return chain[0].name if len(chain) > 1 else "(top level)"

    def phase(self, t: int) -> str:
        if self.backward is None or t < self.backward[0]:
            return "forward"
        return "backward" if t <= self.backward[1] else "after backward"

    def overlapping_regions(self, start: int, end: int) -> dict[str, int]:
        """ns of [start, end] that each ``isopo::`` region overlapped."""
        out: dict[str, int] = defaultdict(int)
        for r in self.regions:
            if r.start >= end:
                break
            overlap = min(end, r.end) - max(start, r.start)
            if overlap > 0:
                out[r.name] += overlap
        return out


@dataclass
class IdleReport:
    start_ns: int
    """The step's first host event: the origin of the gaps' times."""
    wall_ns: int
    busy_ns: int
    gaps: list[Gap]
    by_phase: dict[str, tuple[int, int]]
    """phase → (idle ns, gaps)."""
    by_cause: dict[tuple[str, str], tuple[int, int, int]]
    """(context, launching operator) → (idle ns, gaps, largest gap ns)."""
    by_region: dict[str, int]
    """``isopo::`` region → idle ns it overlapped."""
    largest: list[tuple[Gap, str, str, str]]
    """The widest gaps: (gap, phase, context, launching operator)."""

    @property
    def idle_ns(self) -> int:
        return self.wall_ns - self.busy_ns


def analyse(ops: list[HostOp], spans: list[DeviceSpan], top: int = 12) -> IdleReport | None:
    """The idle report of one profiled step (None without device activity: a CPU profile)."""
    if not spans or not ops:
        return None
    timeline = HostTimeline(ops)
    start = min(op.start for op in ops)
    end = max(s.end for s in spans)
    gaps = idle_gaps(spans, start)
    busy = end - start - sum(gap.length for gap in gaps)
    by_phase: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_cause: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    by_region: dict[str, int] = defaultdict(int)
    described = []
    for gap in gaps:
        launcher = timeline.by_id.get(gap.next_span.launched_by)
        context, name = (timeline.context(launcher), launcher.name) if launcher else ("(unknown)", "(no host op)")
        phase = timeline.phase(launcher.start if launcher else gap.start)
        by_phase[phase][0] += gap.length
        by_phase[phase][1] += 1
        cause = by_cause[(context, name)]
        cause[0] += gap.length
        cause[1] += 1
        cause[2] = max(cause[2], gap.length)
        for region, ns in timeline.overlapping_regions(gap.start, gap.end).items():
            by_region[region] += ns
        described.append((gap, phase, context, name))
    described.sort(key=lambda d: -d[0].length)
    return IdleReport(
        start_ns=start,
        wall_ns=end - start,
        busy_ns=busy,
        gaps=gaps,
        by_phase={k: (v[0], v[1]) for k, v in by_phase.items()},
        by_cause={k: (v[0], v[1], v[2]) for k, v in by_cause.items()},
        by_region=dict(by_region),
        largest=described[:top],
    )


def format_report(report: IdleReport | None, rows: int = 15) -> str:
    if report is None:
        return "GPU idle: no device activity in this profile (a CPU step)"
    ms = 1e-6
    lines = [f"GPU idle: wall {report.wall_ns * ms:.2f} ms, busy {report.busy_ns * ms:.2f} ms, idle "
             f"{report.idle_ns * ms:.2f} ms in {len(report.gaps)} gaps"]
    lines.append("  by phase (of the launch that ended the gap): " + ", ".join(
        f"{phase} {ns * ms:.2f} ms ({n} gaps)" for phase, (ns, n) in
        sorted(report.by_phase.items(), key=lambda kv: -kv[1][0])))
    if report.by_region:
        lines.append("  overlapping ISOPO's host regions: " + ", ".join(
            f"{name} {ns * ms:.2f} ms" for name, ns in sorted(report.by_region.items(), key=lambda kv: -kv[1])))
    lines.append(f"  by cause, the launch that ended the gap ({rows} largest totals):")
    lines.append(f"    {'idle ms':>8} {'gaps':>5} {'widest µs':>9}  context › launching operator")
    for (context, name), (ns, n, widest) in sorted(report.by_cause.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"    {ns * ms:8.2f} {n:5d} {widest / 1e3:9.1f}  {context} › {name}")
    lines.append("  the widest gaps:")
    lines.append(f"    {'at ms':>8} {'µs':>8}  phase, context › launching operator")
    for gap, phase, context, name in report.largest:
        lines.append(f"    {(gap.start - report.start_ns) * ms:8.2f} {gap.length / 1e3:8.1f}  {phase}, {context} › {name}")
    return "\n".join(lines)


def from_profile(prof) -> tuple[list[HostOp], list[DeviceSpan]]:
    """The host events and device spans of a ``torch.profiler.profile`` run (its kineto results)."""
    from torch.autograd import DeviceType

    ops, spans = [], []
    for e in prof.profiler.kineto_results.events():
        kind = e.activity_type() if hasattr(e, "activity_type") else None
        if e.device_type() == DeviceType.CPU:
            # Operators, autograd nodes and regions only: the CUDA runtime and driver calls (cudaLaunchKernel,
            # cudaGraphLaunch, ...) number their events with another counter, whose ids could shadow an operator's.
            if not e.is_async() and e.linked_correlation_id() == 0 and not (kind or "").startswith("cuda"):
                ops.append(HostOp(e.name(), e.start_ns(), e.end_ns(), e.start_thread_id(), e.correlation_id()))
        elif e.duration_ns() > 0 and (kind is None or kind in DEVICE_WORK):
            spans.append(DeviceSpan(e.start_ns(), e.end_ns(), e.linked_correlation_id(), e.name()))
    return ops, spans


# -- the device's time by kernel, one mode against another ------------------------------------------------
_NAME_NOISE = ("void ", "at::native::", "(anonymous namespace)::", "at::", "c10::")


def short_kernel_name(name: str, width: int = 150) -> str:
    """A kernel's name without the namespaces that every PyTorch kernel repeats, cut to ``width``: the
    profiler's tables cut at 55 characters, where every elementwise kernel still reads the same."""
    for noise in _NAME_NOISE:
        name = name.replace(noise, "")
    name = " ".join(name.split())
    return name if len(name) <= width else name[: width - 1] + "…"


def device_time_by_kernel(spans: list[DeviceSpan]) -> dict[str, tuple[int, int]]:
    """{short kernel name: (device ns summed, count)} over a step's device spans."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for span in spans:
        row = totals[short_kernel_name(span.name)]
        row[0] += span.end - span.start
        row[1] += 1
    return {name: (ns, count) for name, (ns, count) in totals.items()}


def format_kernel_difference(mode: str, totals: dict[str, tuple[int, int]], base: str,
                             base_totals: dict[str, tuple[int, int]], rows: int = 20) -> str:
    """The kernels whose summed device time differs most between ``mode`` and ``base``, largest difference
    first: where a mode's extra GPU work goes, kernel by kernel (CUDA-graph replays included)."""
    names = set(totals) | set(base_totals)
    diff = {n: totals.get(n, (0, 0))[0] - base_totals.get(n, (0, 0))[0] for n in names}
    extra = sum(diff.values()) / 1e6
    lines = [f"device time by kernel, {mode} against {base}: {extra:+.2f} ms in all",
             f"  {'diff ms':>8} {mode + ' ms':>12} {'calls':>6} {base + ' ms':>12} {'calls':>6}  kernel"]
    for name in sorted(names, key=lambda n: (-abs(diff[n]), n))[:rows]:
        ns, calls = totals.get(name, (0, 0))
        base_ns, base_calls = base_totals.get(name, (0, 0))
        lines.append(f"  {diff[name] / 1e6:>+8.2f} {ns / 1e6:>12.2f} {calls:>6} {base_ns / 1e6:>12.2f} {base_calls:>6}  {name}")
    return "\n".join(lines)
