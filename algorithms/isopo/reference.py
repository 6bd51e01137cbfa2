"""Naive ISOPO, written for clarity and used only as the tests' oracle.

Every sequence is run through the model ALONE with its own backward pass; hooks record each nn.Linear's
inputs a_t and output gradients δ_t; the per-sequence gradients G_i = Σ_t δ_t a_tᵀ, the statistics, the
regularisers and the weights are then formed explicitly, sequence by sequence, in float64. Nothing here is
shared with the efficient implementation except the function that draws the overlap samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import IsopoConfig


@dataclass
class RefSequence:
    input_ids: torch.Tensor
    """(L,) the sequence, prompt and response, no padding."""
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    """Maps the model's logits (1, L, V) to this sequence's share of the advantage-free micro-batch loss."""
    advantage: float


class ReferenceIsopo:
    def __init__(self, model: nn.Module, cfg: IsopoConfig):
        self.model = model
        self.cfg = cfg
        self.linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        self.ema: dict[tuple[int, str], float] = {}
        self._step_values: dict[tuple[int, str], list[float]] = {}

    # -- one sequence, one backward ---------------------------------------------------------------------
    def _per_sequence(self, seq: RefSequence):
        records: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(self.linears))}
        handles = []
        for i, (_, module) in enumerate(self.linears):
            handles.append(module.register_forward_hook(_save_input(records[i])))
            handles.append(module.register_full_backward_hook(_save_grad_output(records[i])))
        self.model.zero_grad(set_to_none=True)
        try:
            logits = self.model(input_ids=seq.input_ids.unsqueeze(0)).logits
            seq.loss_fn(logits).backward()
        finally:
            for h in handles:
                h.remove()
        grads = {
            name: p.grad.detach().double().clone()
            for name, p in self.model.named_parameters()
            if p.grad is not None
        }
        a = [records[i]["a"].reshape(-1, records[i]["a"].shape[-1]).double() for i in records]
        d = [records[i]["d"].reshape(-1, records[i]["d"].shape[-1]).double() for i in records]
        return grads, a, d

    # -- the micro-batch ----------------------------------------------------------------------------
    def micro_batch_grads(self, sequences: list[RefSequence], samples: torch.Tensor) -> dict[str, torch.Tensor]:
        """samples: (n_layers, K) indices into the micro-batch's tokens, sequences concatenated in order."""
        per_seq = [self._per_sequence(s) for s in sequences]
        adv = [float(s.advantage) for s in sequences]
        b = len(sequences)
        param_name = {id(p): n for n, p in self.model.named_parameters()}

        total: dict[str, torch.Tensor] = {}
        linear_grad_of_seq: list[dict[str, torch.Tensor]] = [{} for _ in range(b)]
        for li, (_, module) in enumerate(self.linears):
            pname = param_name[id(module.weight)]
            g = [per_seq[i][2][li].t() @ per_seq[i][1][li] for i in range(b)]  # G_i = Σ_t δ_t a_tᵀ
            for i in range(b):
                prev = linear_grad_of_seq[i].get(pname)
                linear_grad_of_seq[i][pname] = g[i] if prev is None else prev + g[i]
            a_all = torch.cat([per_seq[i][1][li] for i in range(b)])
            d_all = torch.cat([per_seq[i][2][li] for i in range(b)])
            if self.cfg.variant == "interacting":
                w = self._interacting(li, g, adv)
            else:
                w = self._non_interacting(li, g, adv, a_all, d_all, samples[li])
            update = sum(w[i] * g[i] for i in range(b))
            total[pname] = total.get(pname, 0) + update
            if module.bias is not None:
                bname = param_name[id(module.bias)]
                total[bname] = total.get(bname, 0) + sum(
                    adv[i] * per_seq[i][2][li].sum(0) for i in range(b)
                )
                for i in range(b):
                    linear_grad_of_seq[i][bname] = per_seq[i][2][li].sum(0)

        # Every other gradient (norm gains, the embedding lookup, a tied matrix's non-Linear use): Σ_i A_i g_i.
        for name, _ in self.model.named_parameters():
            for i in range(b):
                g_full = per_seq[i][0].get(name)
                if g_full is None:
                    continue
                rest = g_full - linear_grad_of_seq[i].get(name, 0)
                total[name] = total.get(name, 0) + adv[i] * rest
        return total

    def _non_interacting(self, li, g, adv, a_all, d_all, sample) -> list[float]:
        cfg = self.cfg
        b = len(g)
        norms = [math.sqrt(float((gi * gi).sum())) for gi in g]
        den = math.sqrt(sum(float(d_all[k] @ d_all[k]) * float(a_all[k] @ a_all[k]) for k in sample.tolist()))
        overlaps = []
        for i in range(b):
            u = [float(d_all[k] @ g[i] @ a_all[k]) for k in sample.tolist()]
            overlaps.append(math.sqrt(sum(x * x for x in u)) / den if den > 0 else 0.0)
        ratios = [overlaps[i] / norms[i] if norms[i] > 0 else 0.0 for i in range(b)]
        weights = list(adv)
        for values, coeff, exponent, key in (
            (norms, cfg.c_n, cfg.p, "N"),
            (overlaps, cfg.c_o, cfg.q, "O"),
            (ratios, cfg.c_r, cfg.r, "R"),
        ):
            reg_values = self._regularise(li, key, values, coeff)
            if exponent != 0:
                weights = [weights[i] * reg_values[i] ** exponent for i in range(b)]
        return weights

    def _interacting(self, li, g, adv) -> list[float]:
        b = len(g)
        ntk = torch.tensor([[float((g[i] * g[j]).sum()) for j in range(b)] for i in range(b)], dtype=torch.float64)
        mean_trace = float(ntk.trace()) / b
        lam = self.cfg.c_lambda * self._ema_or(li, "trK", mean_trace)
        self._record(li, "trK", mean_trace)
        solution = torch.linalg.solve(ntk + lam * torch.eye(b, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64))
        return (lam * solution).tolist()

    def _regularise(self, li, key, values, coeff) -> list[float]:
        mean_sq = sum(v * v for v in values) / len(values)
        self._record(li, key, mean_sq)
        if coeff == 0:
            return [abs(v) for v in values]
        reg = coeff * self._ema_or(li, key, mean_sq)
        if self.cfg.reg_form == "additive":
            return [math.sqrt(v * v + reg) for v in values]
        return [math.sqrt(v * v / reg + 1.0) for v in values]

    # -- EMA, kept as plain floats ------------------------------------------------------------------
    def _ema_or(self, li, key, current) -> float:
        return self.ema.get((li, key), current)

    def _record(self, li, key, value) -> None:
        self._step_values.setdefault((li, key), []).append(value)

    def end_step(self) -> None:
        decay = self.cfg.ema_decay
        for key, values in self._step_values.items():
            mean = sum(values) / len(values)
            self.ema[key] = mean if key not in self.ema else decay * self.ema[key] + (1 - decay) * mean
        self._step_values.clear()


def _save_input(store):
    def hook(module, args, output):
        store["a"] = args[0].detach()

    return hook


def _save_grad_output(store):
    def hook(module, grad_input, grad_output):
        store["d"] = grad_output[0].detach()

    return hook
