"""`python -m bench layer-costs`: the per-piece timing of an ISOPO layer's backward (bench/layer_costs.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from algorithms.isopo import kernels
from bench.__main__ import main
from bench.layer_costs import (
    KERNEL_PIECES,
    PIECES,
    Options,
    format_table,
    layer_pieces,
    linear_shapes,
    measure,
)
from bench.models import preset_config


def test_linear_shapes_are_the_presets_seven_projections_per_block():
    cfg = preset_config("small")
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    expected: dict[tuple[int, int], int] = {}
    for shape in [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]:
        expected[shape] = expected.get(shape, 0) + layers
    assert linear_shapes("small") == expected
    assert sum(linear_shapes("qwen3-0.6b").values()) == 7 * 28


def test_measure_times_every_piece_at_every_shape_and_sums_them_over_the_layers():
    opts = Options(model="tiny", batch=2, seq_len=16, num_samples=4, repeats=2, warmup=1)
    result = measure(opts)
    shapes = result["shapes"]
    assert {(r["in"], r["out"]): r["count"] for r in shapes} == linear_shapes("tiny")
    assert all(r["g_bytes"] == 2 * r["in"] * r["out"] * 4 for r in shapes)  # B · in · out float32
    assert list(result["timings"]) == ["eager"]  # graph replays need CUDA
    timing = result["timings"]["eager"]
    assert list(timing["us"]) == list(PIECES)  # no Triton rows: the kernels are for CUDA tensors
    for piece in PIECES:
        assert len(timing["us"][piece]) == len(shapes) and all(u > 0 for u in timing["us"][piece]), piece
        total = sum(u * r["count"] for u, r in zip(timing["us"][piece], shapes, strict=True)) / 1e3
        assert timing["step_ms"][piece] == pytest.approx(total)
    table = format_table(result)
    assert all(piece in table for piece in PIECES) and "per step in float32" in table and "eager:" in table


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "huge"], "unknown model preset 'huge'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--repeats", "0"], "--repeats must be a positive integer"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--batch", "1", "--seq-len", "4", "--num-samples", "5"], "--num-samples 5 exceeds the B·T = 4 tokens"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_options_give_one_clear_error_line_and_exit_2(args, fragment, capsys):
    try:
        rc = main(["layer-costs", *args])
    except SystemExit as e:
        rc = e.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], lines


def test_cli_prints_the_table(capsys):
    assert main(["layer-costs", "--model", "tiny", "--batch", "2", "--seq-len", "8", "--num-samples", "2",
                 "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layer costs:") and "weighted_sum" in out and "step ms" in out


def test_a_failing_piece_is_reported_and_the_rest_measured(monkeypatch, capsys):
    import bench.layer_costs as layer_costs

    real = layer_costs.layer_pieces

    def with_a_broken_piece(*args):
        pieces = real(*args)

        def broken():
            raise RuntimeError("no kernel image for this device")

        return pieces | {"ntk": broken}

    monkeypatch.setattr(layer_costs, "layer_pieces", with_a_broken_piece)
    result = measure(Options(model="tiny", batch=2, seq_len=8, num_samples=2, repeats=1, warmup=0))
    timing = result["timings"]["eager"]
    assert all(u != u for u in timing["us"]["ntk"])  # NaN
    assert all(u > 0 for u in timing["us"]["weighted_sum"])
    assert "warning: ntk (eager) failed: RuntimeError: no kernel image for this device" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2", "ignore:invalid value encountered in multiply")
def test_the_kernel_pieces_run_where_the_kernels_are_usable(monkeypatch):
    """The Triton pieces appear only where ``kernels.usable`` admits G (CUDA); each runs. Without a GPU the
    kernels are admitted for CPU tensors and interpreted (tests/conftest.py sets TRITON_INTERPRET)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = Options(device="cpu", model="tiny", batch=4, seq_len=8, num_samples=5, repeats=1, warmup=0)
    assert not set(KERNEL_PIECES) & set(layer_pieces(16, 8, opts, torch.float32))
    opts = dataclasses.replace(opts, device=device)
    if device == "cpu":
        monkeypatch.setattr(kernels, "usable", lambda g: g.dtype == torch.float32 and g.shape[0] <= 64)
    pieces = layer_pieces(16, 8, opts, torch.float32)
    assert set(KERNEL_PIECES) <= set(pieces)
    for name in KERNEL_PIECES:
        out = pieces[name]()
        first = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(first).all(), name

