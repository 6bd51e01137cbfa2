"""bench.kernel_configs: its settings restore the kernels' constants, its table, and its refusals (it times on
a CUDA GPU only; the timings themselves are taken by bench/device_check.sh on a lent one)."""

from __future__ import annotations

import pytest
import torch

from algorithms.isopo import kernels
from bench import kernel_configs


def test_constants_are_set_inside_the_block_and_restored_after_it_even_on_error():
    before = (kernels.SUM_BLOCK, kernels.SUM_WARPS, kernels.SOLVE_WARPS)
    with kernels.settings(SUM_BLOCK=4096, SOLVE_WARPS=2):
        assert (kernels.SUM_BLOCK, kernels.SOLVE_WARPS) == (4096, 2)
    with pytest.raises(RuntimeError), kernels.settings(SUM_WARPS=2):
        raise RuntimeError
    assert (kernels.SUM_BLOCK, kernels.SUM_WARPS, kernels.SOLVE_WARPS) == before
    for name in ("NOPE", "triton", "usable", "_DTYPES"):  # not a launch constant of the module
        with pytest.raises(ValueError, match=f"unknown kernel setting.*{name}"), kernels.settings(**{name: 1}):
            pass


def test_the_weighted_sum_kernel_gives_the_same_numbers_at_every_candidate_setting():
    """A setting changes the speed only: each column's sum over the rows is the same at every block size."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.randn(8, 5000, generator=torch.Generator().manual_seed(0)).to(device)
    w = torch.randn(8, generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for block, warps in kernel_configs.SUM_SETTINGS:
        with kernels.settings(SUM_BLOCK=block, SUM_WARPS=warps):
            results.append(kernels.weighted_sum(w, g))
    assert all(torch.equal(r, results[0]) for r in results[1:])
    torch.testing.assert_close(results[0].double(), w.double() @ g.double(), rtol=1e-5, atol=1e-5)


def test_report_lays_out_one_row_per_candidate_and_the_step_sum():
    table = {"weighted_sum torch": {"us": [50.0, 22.5], "step_ms": 2.66},
             "weighted_sum block=1024 warps=4": {"us": [12.0, float("nan")], "step_ms": float("nan")}}
    text = kernel_configs.report(table, {(1024, 3072): 28, (1024, 1024): 56}, "Some GPU")
    lines = text.splitlines()
    assert "Some GPU" in lines[0] and "1024>3072 ×28" in lines[1] and "step ms" in lines[1]
    assert lines[2].split()[-3:] == ["50.0", "22.5", "2.66"]
    assert lines[3].split()[-1] == "nan" and len(lines) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2(capsys):
    assert kernel_configs.main(["--model", "tiny"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_an_unknown_model_is_named_with_the_valid_presets(capsys):
    assert kernel_configs.main(["--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model preset 'nope'" in err and "qwen3-0.6b" in err


def test_every_candidate_runs_and_the_kernels_agree_with_their_torch_operation():
    """Each closure the GPU table times, in float32 (without a GPU on CPU tensors, in Triton's interpreter):
    every setting compiles and runs, and each kernel's result matches the torch operation it stands in for."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    found = kernel_configs.candidates(8, 32, 40, device=device, dtype=torch.float32, seq_len=24)
    assert kernels._gram_tma_ready(torch.empty(8, 32 * 40, device=device))  # "gram tma" reads by descriptors
    results = {name: fn() for name, fn in found.items()}
    assert len(found) == 6 + len(kernel_configs.SUM_SETTINGS) + len(kernel_configs.GRAM_SETTINGS) \
        + len(kernel_configs.OUTER_SETTINGS) + len(kernel_configs.TMA_SETTINGS) + len(kernel_configs.NORMS_SETTINGS) \
        + len(kernel_configs.OVERLAP_SETTINGS) + len(kernel_configs.FORM_SETTINGS) + 2 * len(kernel_configs.WARPS)
    for name, got in results.items():
        if name.startswith("weighted_sum block"):
            torch.testing.assert_close(got, results["weighted_sum torch"], rtol=1e-5, atol=1e-5)
        elif name.startswith("gram"):
            torch.testing.assert_close(got, results["ntk torch"], rtol=1e-5, atol=1e-4)
        elif name.startswith("norms kernel"):
            torch.testing.assert_close(got, results["norms torch"], rtol=1e-5, atol=1e-5)
        elif name.startswith("form+gram fused"):
            for part, expected in zip(got, results["form+gram bmm+gram"], strict=True):
                torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-4)
        elif name.startswith("norms+overlap fused"):
            for part, expected in zip(got, results["norms+overlap torch"], strict=True):
                torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-4)
    solves = [v for k, v in results.items() if k.startswith("damped_solve")]
    assert all(torch.equal(s, solves[0]) for s in solves[1:])


def test_measure_hands_over_each_row_as_it_is_done_and_a_failing_setting_reads_nan(monkeypatch, capsys):
    """A run stopped by its time limit keeps the rows it printed: each candidate's row goes out once all
    shapes are timed; a setting that fails to build is NaN with a warning, and the rest go on."""
    shapes = {(16, 32): 2, (32, 16): 1}
    monkeypatch.setattr(kernel_configs, "linear_shapes", lambda model: shapes)
    monkeypatch.setattr(kernel_configs, "candidates", lambda b, d_in, d_out: {"a": d_in, "b": -1})

    def replay(value, repeats, warmup):
        if value < 0:
            raise RuntimeError("does not compile")
        return float(value)

    monkeypatch.setattr(kernel_configs, "replay_us", replay)
    rows = []
    table = kernel_configs.measure("tiny", 8, 3, on_row=lambda name, row: rows.append((name, dict(row))))
    assert [name for name, _ in rows] == ["a", "b"]
    assert rows[0][1] == {"us": [16.0, 32.0], "step_ms": (16.0 * 2 + 32.0) / 1e3}
    assert all(u != u for u in table["b"]["us"])
    assert "warning: b at 16>32 failed: RuntimeError" in capsys.readouterr().out
