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


def test_an_aligned_output_is_a_padded_view_that_a_matmul_writes_in_place():
    """The "aligned out" variants' output: rows padded to 8 elements, and bmm / mm write into it without a copy."""
    x = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    out = matmul_probe.padded_out(2, 5, 5, device="cpu")
    assert out.shape == (2, 5, 5) and out.stride() == (40, 8, 1)
    ptr = out.data_ptr()
    torch.bmm(x, x.transpose(1, 2), out=out)
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, x @ x.transpose(1, 2))
    flat = matmul_probe.padded_out(10, 3, device="cpu")
    assert flat.stride() == (8, 1)
    torch.mm(x.view(10, 7), x.view(10, 7)[:3].t(), out=flat)
    torch.testing.assert_close(flat, x.view(10, 7) @ x.view(10, 7)[:3].t())
