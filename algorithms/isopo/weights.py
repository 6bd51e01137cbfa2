"""From a layer's statistics to the per-sequence weights of its update.

Non-interacting: w_i = A_i · Ñ_i^p · Õ_i^q · R̃_i^r. Interacting: w = Ã = λ (K + λI)⁻¹ A.
All on the device, no host synchronisation: these run inside a layer's backward. The weight functions are
pure: they read the layer's EMAs from a mapping and put the values this micro-batch records into
``recorded`` (key → tensor), which the caller folds into its ``LayerEma`` — so they can also run compiled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from . import kernels
from .config import IsopoConfig


class LayerEma:
    """EMAs of one layer's squared statistics, updated once per optimizer step.

    Within a step every micro-batch records its current value; `update_emas` folds their mean into the EMA.
    Before the first update a read returns the current micro-batch's value, as the specification says.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.value: dict[str, torch.Tensor] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def record(self, key: str, current: torch.Tensor) -> None:
        self.add(key, current.detach(), 1)

    def add(self, key: str, total: torch.Tensor, count: int) -> None:
        """``count`` micro-batches' values at once, summed (a CUDA graph's slots: ``graphs.TailGraph``)."""
        self._sum[key] = self._sum[key] + total if key in self._sum else total
        self._count[key] = self._count.get(key, 0) + count


def update_emas(emas: Iterable[LayerEma]) -> None:
    """Every layer's EMA update, once per optimizer step, at once: the same arithmetic (mean = sum / count, then
    decay·old + (1 − decay)·mean) as a few multi-tensor operations over every layer's statistics, instead of
    three or four one-element operations per layer and statistic — on a GPU each of those is a kernel launch,
    ~200 layers' worth of host time at the end of every step."""
    firsts: list[tuple[LayerEma, str]] = []
    first_sums: list[torch.Tensor] = []
    first_counts: list[int] = []
    updated: list[tuple[LayerEma, str]] = []
    olds: list[torch.Tensor] = []
    sums: list[torch.Tensor] = []
    counts: list[int] = []
    decays: list[float] = []
    for ema in emas:
        for key, total in ema._sum.items():
            old = ema.value.get(key)
            if old is None:
                firsts.append((ema, key))
                first_sums.append(total)
                first_counts.append(ema._count[key])
            else:
                updated.append((ema, key))
                olds.append(old)
                sums.append(total)
                counts.append(ema._count[key])
                decays.append(ema.decay)
        ema._sum = {}
        ema._count = {}
    if firsts:
        for (ema, key), mean in zip(firsts, torch._foreach_div(first_sums, first_counts)):
            ema.value[key] = mean
    if updated:
        means = torch._foreach_div(sums, counts)
        new = torch._foreach_mul(olds, decays)
        torch._foreach_add_(new, torch._foreach_mul(means, [1.0 - d for d in decays]))
        for (ema, key), value in zip(updated, new):
            ema.value[key] = value


def regularised(x: torch.Tensor, coeff: float, form: str, ema: Mapping[str, torch.Tensor],
                recorded: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """x̃ for a statistic x ≥ 0. With coeff = 0 it is x itself, and the EMA it would read is not kept.
    Before the first EMA update the current micro-batch's value stands in for it."""
    if coeff == 0:
        return x
    mean_sq = (x * x).mean()
    recorded[key] = mean_sq
    reg = coeff * ema.get(key, mean_sq)
    if form == "additive":
        return torch.sqrt(x * x + reg)
    return torch.sqrt(x * x / reg + 1.0)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den = 0 (den ≥ 0)."""
    return torch.where(den > 0, num / den, 0.0)


def unregularised(cfg: IsopoConfig) -> bool:
    """Whether the weights are A N^(p−r) O^(q+r): no regularisation, and no q = −r ≠ 0 (whose ratio and
    overlap would cancel to 0^0 where the overlap vanishes)."""
    return cfg.c_n == 0 and cfg.c_o == 0 and cfg.c_r == 0 and (cfg.q + cfg.r != 0 or cfg.q == 0)


def needs_norm(cfg: IsopoConfig) -> bool:
    """Whether the non-interacting weights read N_i at all (not for `overlap`: w = A/O), so that the pass
    over the per-sequence gradients that computes it can be skipped."""
    if unregularised(cfg):
        return cfg.p != cfg.r
    return cfg.p != 0 or cfg.c_n != 0 or cfg.r != 0 or cfg.c_r != 0


def non_interacting_weights(
    norm: torch.Tensor | None,
    overlap_num: torch.Tensor,
    overlap_den: torch.Tensor,
    adv: torch.Tensor,
    cfg: IsopoConfig,
    ema: Mapping[str, torch.Tensor],
    recorded: dict[str, torch.Tensor],
) -> torch.Tensor:
    """norm: (B,) N_i (None where ``needs_norm(cfg)`` is false); overlap_num: (B, K) δ_kᵀ G_i a_k;
    overlap_den: ‖(‖δ_k‖‖a_k‖)_k‖₂ (a scalar, in the statistics' dtype).

    Every statistic here is a (B,)-vector, so each operation is one tiny kernel whose cost is its launch:
    a statistic with exponent 0 and no regularisation is skipped, not computed and multiplied in as 1.
    """
    overlap = torch.linalg.vector_norm(overlap_num, dim=1, dtype=overlap_den.dtype) / overlap_den
    if unregularised(cfg):
        # Unregularised: A N^p O^q (O/N)^r = A N^(p−r) O^(q+r), two powers instead of a ratio and three.
        # Where N = 0 (then O = 0) or O = 0, the old form's 0-valued ratio or overlap gave 0·∞ or 0^e
        # just as these powers do: the same weights, 0 after the clean-up below.
        w = adv if adv.dtype == overlap.dtype else adv.to(overlap.dtype)
        if cfg.p != cfg.r:
            w = w * norm ** (cfg.p - cfg.r)
        if cfg.q + cfg.r != 0:
            w = w * overlap ** (cfg.q + cfg.r)
        return torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
    overlap = torch.where(overlap_den > 0, overlap, 0.0)
    w = adv.to(overlap.dtype)
    if cfg.p != 0 or cfg.c_n != 0:
        w = w * regularised(norm, cfg.c_n, cfg.reg_form, ema, recorded, "N") ** cfg.p
    if cfg.q != 0 or cfg.c_o != 0:
        w = w * regularised(overlap, cfg.c_o, cfg.reg_form, ema, recorded, "O") ** cfg.q
    if cfg.r != 0 or cfg.c_r != 0:
        ratio = _safe_div(overlap, norm)
        w = w * regularised(ratio, cfg.c_r, cfg.reg_form, ema, recorded, "R") ** cfg.r
    # A sequence whose statistic is undefined in this layer (no gradient here, or an overlap sample that saw
    # none) would get 0·∞; it contributes nothing to this layer instead of poisoning the whole update.
    return torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)


def interacting_weights(ntk: torch.Tensor, adv: torch.Tensor, cfg: IsopoConfig, ema: Mapping[str, torch.Tensor],
                        recorded: dict[str, torch.Tensor]) -> torch.Tensor:
    """Ã = λ (K + λI)⁻¹ A with λ = c_λ · EMA(tr K / B).

    The B × B system is solved by Cholesky and two triangular solves, in float64 (a few hundred flops): none
    of them checks its result on the host, where ``linalg.solve`` (even ``solve_ex``) reads its pivots back
    and so synchronised every layer's backward with the device. K + λI is SPD for λ > 0; should the
    factorisation still fail (λ = 0: every G_i vanished in this layer, so any weight gives the same zero
    update), the weights fall back to A, the λ → ∞ limit. With ``IsopoConfig.triton_kernels`` a CUDA NTK's
    system is solved the same way in one Triton program (``kernels.damped_solve``).
    """
    mean_trace = ntk.diagonal().mean()
    recorded["trK"] = mean_trace
    lam = ema.get("trK", mean_trace)
    if cfg.c_lambda != 1.0:
        lam = cfg.c_lambda * lam
    if cfg.kernels_enabled and kernels.usable(ntk):
        return kernels.damped_solve(ntk, adv, lam)
    system = ntk.to(torch.float64)
    system.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(system)
    y = torch.linalg.solve_triangular(chol, adv.to(torch.float64).unsqueeze(1), upper=False)
    solution = torch.linalg.solve_triangular(chol.mT, y, upper=True).squeeze(1)
    w = (lam * solution).to(ntk.dtype)
    return torch.where((info == 0) & (lam > 0), w, adv if adv.dtype == ntk.dtype else adv.to(ntk.dtype))
