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
    mean_sq = (x * x).mean()
    ema.record(key, mean_sq)
    if coeff == 0:
        return x.abs()
    reg = coeff * ema.read(key, mean_sq)
    if form == "additive":
        return torch.sqrt(x * x + reg)
    return torch.sqrt(x * x / reg + 1.0)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def non_interacting_weights(
    n_sq: torch.Tensor,
    overlap_num: torch.Tensor,
    overlap_den: torch.Tensor,
    adv: torch.Tensor,
    cfg: IsopoConfig,
    ema: LayerEma,
) -> torch.Tensor:
    """n_sq: (B,) N_i²; overlap_num: (B, K) δ_kᵀ G_i a_k; overlap_den: ‖(‖δ_k‖‖a_k‖)_k‖₂ (a scalar)."""
    norm = torch.sqrt(n_sq)
    overlap = _safe_div(torch.linalg.vector_norm(overlap_num, dim=1), overlap_den)
    ratio = _safe_div(overlap, norm)
    w = adv.to(n_sq.dtype)
    for x, coeff, exponent, key in (
        (norm, cfg.c_n, cfg.p, "N"),
        (overlap, cfg.c_o, cfg.q, "O"),
        (ratio, cfg.c_r, cfg.r, "R"),
    ):
        x_reg = regularised(x, coeff, cfg.reg_form, ema, key)
        if exponent != 0:
            w = w * x_reg**exponent
    # A sequence whose statistic is undefined in this layer (no gradient here, or an overlap sample that saw
    # none) would get 0·∞; it contributes nothing to this layer instead of poisoning the whole update.
    return torch.where(torch.isfinite(w), w, torch.zeros_like(w))


def interacting_weights(ntk: torch.Tensor, adv: torch.Tensor, cfg: IsopoConfig, ema: LayerEma) -> torch.Tensor:
    """Ã = λ (K + λI)⁻¹ A with λ = c_λ · EMA(tr K / B)."""
    b = ntk.shape[0]
    mean_trace = ntk.diagonal().sum() / b
    ema.record("trK", mean_trace)
    lam = cfg.c_lambda * ema.read("trK", mean_trace)
    eye = torch.eye(b, dtype=ntk.dtype, device=ntk.device)
    adv = adv.to(ntk.dtype)
    # solve_ex skips the error check that would synchronise with the host; K + λI is SPD when λ > 0.
    solution, _ = torch.linalg.solve_ex(ntk + lam * eye, adv.unsqueeze(1))
    w = lam * solution.squeeze(1)
    # λ = 0 only when every G_i vanishes in this layer, and then any weight gives the same zero update.
    return torch.where(lam > 0, w, adv)
