"""From a layer's statistics to the per-sequence weights of its update.

Non-interacting: w_i = A_i · Ñ_i^p · Õ_i^q · R̃_i^r. Interacting: w = Ã = λ (K + λI)⁻¹ A.
All on the device, no host synchronisation: these run inside a layer's backward.
"""

from __future__ import annotations

import torch

from .config import IsopoConfig


class LayerEma:
    """EMAs of one layer's squared statistics, updated once per optimizer step.

    Within a step every micro-batch records its current value; `update` folds their mean into the EMA.
    Before the first update a read returns the current micro-batch's value, as the specification says.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.value: dict[str, torch.Tensor] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def read(self, key: str, current: torch.Tensor) -> torch.Tensor:
        return self.value.get(key, current)

    def record(self, key: str, current: torch.Tensor) -> None:
        current = current.detach()
        self._sum[key] = self._sum[key] + current if key in self._sum else current
        self._count[key] = self._count.get(key, 0) + 1

    def update(self) -> None:
        for key, total in self._sum.items():
            mean = total / self._count[key]
            old = self.value.get(key)
            self.value[key] = mean if old is None else self.decay * old + (1.0 - self.decay) * mean
        self._sum.clear()
        self._count.clear()


def regularised(x: torch.Tensor, coeff: float, form: str, ema: LayerEma, key: str) -> torch.Tensor:
    """x̃ for a statistic x ≥ 0. With coeff = 0 it is x itself, and the EMA it would read is not kept."""
    if coeff == 0:
        return x
    mean_sq = (x * x).mean()
    ema.record(key, mean_sq)
    reg = coeff * ema.read(key, mean_sq)
    if form == "additive":
        return torch.sqrt(x * x + reg)
    return torch.sqrt(x * x / reg + 1.0)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den = 0 (den ≥ 0)."""
    return torch.where(den > 0, num / den, 0.0)


def non_interacting_weights(
    n_sq: torch.Tensor,
    overlap_num: torch.Tensor,
    overlap_den: torch.Tensor,
    adv: torch.Tensor,
    cfg: IsopoConfig,
    ema: LayerEma,
) -> torch.Tensor:
    """n_sq: (B,) N_i²; overlap_num: (B, K) δ_kᵀ G_i a_k; overlap_den: ‖(‖δ_k‖‖a_k‖)_k‖₂ (a scalar).

    Every statistic here is a (B,)-vector, so each operation is one tiny kernel whose cost is its launch:
    a statistic with exponent 0 and no regularisation is skipped, not computed and multiplied in as 1.
    """
    norm = torch.sqrt(n_sq)
    overlap = _safe_div(torch.linalg.vector_norm(overlap_num, dim=1), overlap_den)
    w = adv.to(n_sq.dtype)
    if cfg.p != 0 or cfg.c_n != 0:
        w = w * regularised(norm, cfg.c_n, cfg.reg_form, ema, "N") ** cfg.p
    if cfg.q != 0 or cfg.c_o != 0:
        w = w * regularised(overlap, cfg.c_o, cfg.reg_form, ema, "O") ** cfg.q
    if cfg.r != 0 or cfg.c_r != 0:
        ratio = _safe_div(overlap, norm)
        w = w * regularised(ratio, cfg.c_r, cfg.reg_form, ema, "R") ** cfg.r
    # A sequence whose statistic is undefined in this layer (no gradient here, or an overlap sample that saw
    # none) would get 0·∞; it contributes nothing to this layer instead of poisoning the whole update.
    return torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)


def interacting_weights(ntk: torch.Tensor, adv: torch.Tensor, cfg: IsopoConfig, ema: LayerEma) -> torch.Tensor:
    """Ã = λ (K + λI)⁻¹ A with λ = c_λ · EMA(tr K / B). Overwrites ntk's diagonal with that of K + λI."""
    diag = ntk.diagonal()
    mean_trace = diag.mean()
    ema.record("trK", mean_trace)
    lam = ema.read("trK", mean_trace)
    if cfg.c_lambda != 1.0:
        lam = cfg.c_lambda * lam
    diag.add_(lam)
    adv = adv.to(ntk.dtype)
    # solve_ex skips the error check that would synchronise with the host; K + λI is SPD when λ > 0.
    solution, _ = torch.linalg.solve_ex(ntk, adv.unsqueeze(1))
    w = lam * solution.squeeze(1)
    # λ = 0 only when every G_i vanishes in this layer, and then any weight gives the same zero update.
    return torch.where(lam > 0, w, adv)
