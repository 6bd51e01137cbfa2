"""bench.kernel_compile: ISOPO's Triton kernels built for a Hopper GPU (sm_90a) on this GPU-free machine, by
Triton's compiler and ptxas — a kernel that would not build on a lent H100/H200, or would spill registers
at its launch settings, fails here first. The suite runs Triton's interpreter (tests/conftest.py), under
which nothing compiles: the command runs in a process of its own without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from algorithms.isopo import kernels
from bench import kernel_compile

ROOT = Path(__file__).resolve().parents[1]


def _compile_command(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "bench.kernel_compile", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


KERNELS = """
import triton
import triton.language as tl


@triton.jit
def copy(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2)


@triton.jit
def vector_dot(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.dot(tl.load(x_ptr + offsets), tl.load(x_ptr + offsets)))  # two vectors
"""
RUN_WITH = """
import sys
import two_kernels
from bench import kernel_compile
signature, constants = {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16}
kernel_compile.launches = lambda candidates=False: [
    kernel_compile.Launch("vector_dot", two_kernels.vector_dot, signature, constants),
    kernel_compile.Launch("copy", two_kernels.copy, signature, constants)]
sys.exit(kernel_compile.main([]))
"""


def test_every_kernel_builds_for_sm90_at_its_launch_settings_without_spilling():
    done = _compile_command()
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert len(rows) == len(kernel_compile.launches()) == 11
    for row in rows:
        registers, spills, shared = (int(v) for v in row[-3:])
        assert 0 < registers <= 255 and spills == 0, row
        assert shared <= 227 * 1024, row  # an H100's shared memory per block
    fused = next(row for row in rows if row[0] == "norms+overlap")
    assert int(fused[-1]) > 0  # its tiles staged in shared memory (TMA and the tensor cores)
    tma = next(row for row in rows if row[:2] == ["gram", "tma"])
    assert int(tma[-1]) >= 16 * kernels.TMA_SUB * kernels.TMA_BLOCK * 2  # a whole bf16 tile copied in


def test_a_kernel_that_does_not_build_is_named_and_the_rest_still_reported(tmp_path):
    (tmp_path / "two_kernels.py").write_text(KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{tmp_path}"
    done = subprocess.run([sys.executable, "-c", RUN_WITH], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert out[1].startswith("vector_dot") and "does not compile" in out[1]
    assert out[2].split()[0] == "copy" and out[2].split()[-2] == "0"


def test_bad_arguments_and_the_interpreter_are_one_clear_error(capsys):
    assert kernel_compile.main(["--arch", "70"]) == 2
    assert "--arch must be 80 or more" in capsys.readouterr().err
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert kernel_compile.main([]) == 2
    assert "TRITON_INTERPRET=1 is set" in capsys.readouterr().err
