"""Every ISOPO knob in one dataclass, with the named settings of the specification."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

REG_FORMS = ("additive", "keep_small_invariant")
VARIANTS = ("non_interacting", "interacting")
STRATEGIES = ("auto", "instantiate", "gram")

# Exponents (p, q, r) of the named non-interacting settings.
NAMED_SETTINGS: dict[str, tuple[float, float, float]] = {
    # The setting the paper reports as matching or beating GRPO.
    "paper": (0.0, -1.0, -2.0),
    # w = A / O: the released non-interacting run.
    "overlap": (0.0, -1.0, 0.0),
    # w = A N² / O²: the exact Fisher line-search step along G_i.
    "rel_overlap": (0.0, 0.0, -2.0),
    # w = A: plain REINFORCE through the ISOPO machinery (a consistency check).
    "reinforce": (0.0, 0.0, 0.0),
}


@dataclass
class IsopoConfig:
    """ISOPO gradient transform of every nn.Linear weight (see the project's ISOPO specification)."""

    variant: str = "non_interacting"
    """`non_interacting` (per-sequence reweighting w_i) or `interacting` (damped per-layer NTK solve)."""
    setting: str | None = "paper"
    """Named exponents (`paper`, `overlap`, `rel_overlap`, `reinforce`); None means use p, q, r as given."""
    p: float = 0.0
    """Exponent of the regularised per-sequence gradient norm Ñ_i (ignored when `setting` is named)."""
    q: float = -1.0
    """Exponent of the regularised Fisher-norm estimate Õ_i (ignored when `setting` is named)."""
    r: float = -2.0
    """Exponent of the regularised ratio R̃_i = O_i/N_i (ignored when `setting` is named)."""
    c_n: float = 0.0
    """Regularisation coefficient of N: reg = c_n · EMA(mean_i N_i²). 0 means Ñ = |N|."""
    c_o: float = 0.0
    """Regularisation coefficient of O (as c_n)."""
    c_r: float = 0.0
    """Regularisation coefficient of R (as c_n)."""
    reg_form: str = "additive"
    """`additive`: x̃ = sqrt(x² + reg); `keep_small_invariant`: x̃ = sqrt(x²/reg + 1)."""
    num_samples: int = 250
    """K, the token positions sampled (without replacement) per layer and micro-batch for O_i."""
    ema_decay: float = 0.9
    """EMA decay of the per-layer statistics, updated once per optimizer step: ema ← d·ema + (1−d)·value."""
    c_lambda: float = 1.0
    """Interacting damping: λ = c_lambda · EMA(tr K / B)."""
    seed: int = 0
    """Seed of the position sampler; the draw also depends on step, micro-batch and layer, so runs repeat."""
    strategy: str = "auto"
    """Per-layer statistics: `instantiate` per-sequence gradients, `gram` matrices, or `auto` by FLOP count."""
    chunk_bytes: int = 256 * 2**20
    """Largest per-sequence-gradient block (B·out_chunk·in elements × itemsize) held at once; the output
    dimension is chunked above it (the LM head)."""
    compile: bool = False
    """Run each layer's ISOPO computation (statistics, weights, weighted gradient) through torch.compile:
    a few fused kernels instead of ~30 small ones, for GPUs where launching them is what costs. The first
    backward compiles (seconds to minutes); layers whose G is formed in chunks stay eager; if compiling
    fails the layers run eagerly, with a warning."""
    triton_kernels: bool = True
    """On CUDA, from the per-sequence gradients G to the weights and the weighted sum Σ_i w_i G_i through the
    Triton kernels of ``kernels.py``: the NTK by a Gram kernel that reads G once (cuBLAS's split-K matmul
    reads it far slower), the B × B solve and, for the named settings, the non-interacting weights each in
    one program, the weighted sum in one read of G. On by default: on an H200 at Qwen3-0.6B shapes they cut
    the layers' GPU time per step from 37.5 to 24.2 ms (non-interacting) and from 44.1 to 23.3 ms
    (interacting), and the step from 1.27× to 1.15× of REINFORCE for the interacting variant (BENCHMARKS.md,
    session 11). Needs Triton (part of CUDA builds of torch) and B ≤ 64; otherwise, for float64 or CPU
    tensors, and under `compile`, the torch path runs. False: the torch path everywhere."""
    cuda_graphs: bool | None = None
    """On CUDA, replay the small-tensor tail of each layer's backward (statistics from the per-sequence
    gradients, weights) as one captured CUDA graph per layer shape instead of launching its ~15 kernels one
    by one (on an H100 an ISOPO step 1.50× → 1.24× of REINFORCE's, BENCHMARKS.md). Each shape (B, in, out,
    K; not T) is captured once and kept (the 32 latest), so it pays when micro-batches repeat B. Layers whose
    statistics take the Gram route, whose G is chunked or that see a token-layout view (the LM head on the
    response columns), and CPU tensors, stay eager; if a capture fails the layers run eagerly, with a warning.
    None (default): on unless `compile` is set, the alternative; False: every layer eager."""

    @property
    def kernels_enabled(self) -> bool:
        """Whether CUDA tensors take the Triton kernels: `triton_kernels`, unless compiling."""
        return self.triton_kernels and not self.compile

    @property
    def graphs_enabled(self) -> bool:
        """Whether CUDA tensors take the graphed tail: `cuda_graphs`, or by default unless compiling."""
        return self.cuda_graphs if self.cuda_graphs is not None else not self.compile

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"isopo variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        if self.setting is not None:
            if self.setting not in NAMED_SETTINGS:
                raise ValueError(
                    f"unknown isopo setting {self.setting!r}; valid settings: {', '.join(NAMED_SETTINGS)}"
                )
            self.p, self.q, self.r = NAMED_SETTINGS[self.setting]
        if self.reg_form not in REG_FORMS:
            raise ValueError(f"isopo reg_form must be one of {', '.join(REG_FORMS)}; got {self.reg_form!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"isopo strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        for name in ("c_n", "c_o", "c_r"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"isopo {name} must be >= 0; got {getattr(self, name)}")
        if not self.c_lambda > 0:
            # λ = 0 would make Ã = λ (K + λI)⁻¹ A vanish: the minimum-norm step is only its λ → 0 direction.
            raise ValueError(f"isopo c_lambda must be > 0; got {self.c_lambda}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"isopo num_samples (K) must be a positive integer; got {self.num_samples!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"isopo ema_decay must lie in [0, 1); got {self.ema_decay}")
        if self.compile and self.cuda_graphs is True:
            raise ValueError("isopo compile and cuda_graphs are alternatives; set at most one of them")
        if self.chunk_bytes < 1:
            raise ValueError(f"isopo chunk_bytes must be positive; got {self.chunk_bytes}")

    def replace(self, **changes) -> IsopoConfig:
        return dataclasses.replace(self, **changes)
