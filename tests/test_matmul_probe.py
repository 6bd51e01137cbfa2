"""bench.matmul_probe: its refusals (it times CUDA matmuls; a CUDA host's run is in BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch

from bench import matmul_probe


@pytest.mark.parametrize(("argv", "message"), [
    (["--seq-lens", "513,x"], "--seq-lens must be comma-separated integers; got '513,x'"),
    (["--samples", "0"], "must be positive"),
    (["--seq-lens", "513,-1"], "must be positive"),
])
def test_bad_arguments_are_named_and_exit_2(capsys, argv, message):
    assert matmul_probe.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2(capsys):
    assert matmul_probe.main([]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
