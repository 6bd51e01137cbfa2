"""bench.gaps: the GPU's idle time in a profiled step, by phase, cause and ISOPO host region — on synthetic
timelines whose answer is known, and on a real CPU profile of an ISOPO step (the host half of the reading)."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import profile

from algorithms.isopo import Isopo, IsopoConfig
from algorithms.isopo.batch import _NO_REGION, host_region
from bench.gaps import (
    NODE_PREFIX,
    DeviceSpan,
    HostOp,
    analyse,
    device_time_by_kernel,
    format_kernel_difference,
    format_report,
    from_profile,
    idle_gaps,
    short_kernel_name,
)

NODE = NODE_PREFIX + "IsopoLinearFunctionBackward"


def test_idle_gaps_start_at_the_window_and_skip_overlaps():
    spans = [DeviceSpan(50, 60, 0), DeviceSpan(10, 40, 1), DeviceSpan(20, 30, 2), DeviceSpan(35, 45, 3)]
    gaps = idle_gaps(spans, window_start=0)
    assert [(g.start, g.end, g.next_span.launched_by) for g in gaps] == [(0, 10, 1), (45, 50, 0)]
    assert idle_gaps(spans, window_start=10)[0].start == 45  # no gap before the first span at the window's start


def _timeline():
    """A forward matmul, then a backward node whose gather waits on a sample draw, then an end-of-step add.
    Times in ns; the device runs each launch's kernel 100 ns after the launch, for 200 ns."""
    ops = [
        HostOp("aten::mm", 0, 50, thread=1, id=1),
        HostOp("isopo::draw_samples", 1000, 5000, thread=2, id=2),
        HostOp(NODE, 900, 6000, thread=2, id=3),
        HostOp("aten::index_select", 5100, 5200, thread=2, id=4),
        HostOp("aten::bmm", 5300, 5400, thread=2, id=5),
        HostOp("isopo::end_step", 8000, 9000, thread=1, id=6),
        HostOp("aten::add", 8500, 8600, thread=1, id=7),
    ]
    spans = [DeviceSpan(op.start + 100, op.start + 300, op.id) for op in ops if op.name.startswith("aten::")]
    return ops, spans


def test_analyse_splits_the_idle_time_by_phase_cause_and_region():
    ops, spans = _timeline()
    report = analyse(ops, spans)
    # Spans: 100-300, 5200-5400, 5400-5600, 8600-8800; the window starts at the first host event (0).
    assert report.wall_ns == 8800 and report.busy_ns == 800 and report.idle_ns == 8000
    assert sum(g.length for g in report.gaps) == report.idle_ns
    assert report.by_phase == {"forward": (100, 1), "backward": (4900, 1), "after backward": (3000, 1)}
    assert report.by_cause[("IsopoLinearFunctionBackward", "aten::index_select")] == (4900, 1, 4900)
    assert report.by_cause[("isopo::end_step", "aten::add")] == (3000, 1, 3000)
    assert report.by_cause[("(top level)", "aten::mm")] == (100, 1, 100)
    # The draw (1000-5000) overlapped 4000 ns of the 300-5200 gap; the end-of-step region 600 ns of 5600-8600.
    assert report.by_region == {"isopo::draw_samples": 4000, "isopo::end_step": 600}
    assert [g.length for g, *_ in report.largest] == [4900, 3000, 100]


def test_a_kernel_with_no_known_launcher_is_still_counted():
    ops, spans = _timeline()
    spans.append(DeviceSpan(9500, 9600, launched_by=99))
    report = analyse(ops, spans)
    assert report.by_cause[("(unknown)", "(no host op)")] == (700, 1, 700)
    assert sum(g.length for g in report.gaps) == report.idle_ns


def test_format_report_names_causes_regions_and_the_widest_gaps():
    text = format_report(analyse(*_timeline()))
    assert text.startswith("GPU idle: wall 0.01 ms, busy 0.00 ms, idle 0.01 ms in 3 gaps")
    assert "backward 0.00 ms (1 gaps)" in text
    assert "IsopoLinearFunctionBackward › aten::index_select" in text
    assert "isopo::draw_samples" in text.split("overlapping ISOPO's host regions:")[1].splitlines()[0]
    widest = text.split("the widest gaps:")[1].splitlines()[2]
    assert widest.split()[:2] == ["0.00", "4.9"] and "backward, IsopoLinearFunctionBackward" in widest
    assert analyse([], []) is None and "no device activity" in format_report(None)


def test_host_regions_appear_only_under_a_profiler():
    assert host_region("isopo::x") is _NO_REGION
    with profile() as prof:
        with host_region("isopo::x"):
            torch.ones(2)
    ops, spans = from_profile(prof)
    assert spans == []
    names = [op.name for op in ops]
    assert "isopo::x" in names and "aten::ones" in names


def test_a_real_isopo_profile_puts_its_host_work_in_regions_and_context():
    """The host half of the reading on a CPU profile of one ISOPO step: the regions are recorded, and a gap
    before a kernel launched in the backward is traced to its autograd node (device spans are made up: one
    per matmul, just after it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 4, bias=False))
    engine = Isopo(model, IsopoConfig(setting="paper", num_samples=3, cuda_graphs=False))
    x = torch.randn(2, 5, 8)
    seq_ids = torch.arange(2).unsqueeze(1).expand(2, 5)
    with engine.installed(), profile() as prof:
        with engine.micro_batch(seq_ids, torch.tensor([1.0, -1.0])):
            model(x).square().sum().backward()
        engine.end_step()
    ops, _ = from_profile(prof)
    names = {op.name for op in ops}
    assert {"isopo::micro_batch", "isopo::draw_samples", "isopo::samples_to_device", "isopo::end_step"} <= names
    bmms = [op for op in ops if op.name == "aten::bmm"]
    assert len(bmms) >= 2  # G_i of each layer (and the overlap's δ_kᵀ G_i)
    spans = [DeviceSpan(op.end + 1000, op.end + 2000, op.id) for op in bmms]
    report = analyse(ops, spans)
    assert set(report.by_cause) == {("IsopoLinearFunctionBackward", "aten::bmm")}
    assert set(report.by_phase) == {"backward"}
    assert "isopo::micro_batch" in report.by_region  # the first gap runs from the step's start


def test_from_profile_keeps_kernels_copies_and_operators_only():
    """The CUDA reading, on stand-in kineto events: kernels, copies and memsets are the device's work (a
    GPU-side annotation spans gaps, so it is not); operators, autograd nodes and regions are the host's,
    and CUDA runtime calls, which link to their operator as its kernels do, are left out."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, start, end, device, kind, corr=0, linked=0, thread=1, is_async=False):
        return SimpleNamespace(
            name=lambda: name, start_ns=lambda: start, end_ns=lambda: end, duration_ns=lambda: end - start,
            device_type=lambda: device, activity_type=lambda: kind, correlation_id=lambda: corr,
            linked_correlation_id=lambda: linked, start_thread_id=lambda: thread, is_async=lambda: is_async)

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [
        event("aten::mm", 0, 50, cpu, "cpu_op", corr=7),
        event("cudaLaunchKernel", 10, 20, cpu, "cuda_runtime", corr=7, linked=7),  # the runtime call's id is 7 too
        event("isopo::draw_samples", 60, 90, cpu, "user_annotation", corr=8),
        event("gemm_kernel", 100, 200, cuda, "kernel", corr=40, linked=7),
        event("Memcpy HtoD", 210, 220, cuda, "gpu_memcpy", linked=7),
        event("Memset", 230, 231, cuda, "gpu_memset", linked=7),
        event("isopo::draw_samples", 100, 400, cuda, "gpu_user_annotation", linked=8),
        event("aten::empty", 5, 6, cpu, "cpu_op", corr=9, is_async=True),
    ]
    prof = SimpleNamespace(profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events)))
    ops, spans = from_profile(prof)
    assert [(op.name, op.id) for op in ops] == [("aten::mm", 7), ("isopo::draw_samples", 8)]
    assert spans == [DeviceSpan(100, 200, 7, "gemm_kernel"), DeviceSpan(210, 220, 7, "Memcpy HtoD"),
                     DeviceSpan(230, 231, 7, "Memset")]
    report = analyse(ops, spans)
    assert report.busy_ns == 111 and report.by_cause[("(top level)", "aten::mm")] == (120, 3, 100)


def test_device_time_by_kernel_and_the_difference_against_a_baseline():
    """Kernels summed by their shortened names (two template instances that differ past the profiler's 55
    characters stay apart); the difference table lists the largest changes first, with both sides' calls."""
    copy = "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)>"
    mul = "void at::native::vectorized_elementwise_kernel<8, at::native::BinaryFunctor<c10::BFloat16, MulFunctor>>"
    assert short_kernel_name(copy) == "vectorized_elementwise_kernel<8, bfloat16_copy_kernel_cuda(TensorIteratorBase&)>"
    assert short_kernel_name("k" * 200, width=20) == "k" * 19 + "…"
    base = device_time_by_kernel([DeviceSpan(0, 1_000_000, 1, copy), DeviceSpan(0, 2_000_000, 2, "gemm")])
    mode = device_time_by_kernel([DeviceSpan(0, 1_000_000, 1, copy), DeviceSpan(5, 3_000_005, 1, copy),
                                  DeviceSpan(0, 500_000, 3, mul), DeviceSpan(0, 2_000_000, 2, "gemm"),
                                  DeviceSpan(0, 250_000, 4, "_gram_kernel")])
    assert mode[short_kernel_name(copy)] == (4_000_000, 2) and mode["gemm"] == (2_000_000, 1)
    text = format_kernel_difference("isopo_int", mode, "reinforce", base, rows=3)
    lines = text.splitlines()
    assert lines[0] == "device time by kernel, isopo_int against reinforce: +3.75 ms in all"
    assert lines[2].split()[:5] == ["+3.00", "4.00", "2", "1.00", "1"] and "bfloat16_copy" in lines[2]
    assert lines[3].split()[:5] == ["+0.50", "0.50", "1", "0.00", "0"] and "MulFunctor" in lines[3]
    assert lines[4].split()[-1] == "_gram_kernel" and len(lines) == 5  # gemm: no difference, past the rows
