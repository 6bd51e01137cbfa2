"""Hook-based ISOPO in the style of the author's public reference code: the timing baseline of
``python -m bench overhead`` (modes ``isopo_ni_hooks`` and ``isopo_int_hooks``).

How it works, and what makes it slower than ``algorithms.isopo``:

- a forward hook on every ``nn.Linear`` keeps its input a (the same storage autograd saves anyway) and a
  *full* backward hook keeps its output gradient δ (extra memory: one (tokens × out) tensor per layer, held
  until the end of the backward pass);
- the ORDINARY backward runs, so every Linear weight gradient Σ_t δ_t a_tᵀ is computed and then thrown away;
- afterwards, per layer, a Python loop over the sequences forms each G_i = δ_iᵀ a_i (out × in), its norm N_i
  and overlap O_i on the K sampled positions (non-interacting), or the B × B NTK from the stacked G_i
  (interacting), then the weights, and ``weight.grad`` is overwritten with Σ_i w_i G_i.

Conventions (chosen to agree with the project's specification, so that a test can compare the Linear
weight gradients with the efficient engine exactly):

- statistics, sampling and weights follow ``ISOPO.md``: K positions drawn with
  ``algorithms.isopo.draw_overlap_samples`` from the micro-batch's valid (non-padding) tokens in row-major
  order, with the engine's (seed, step, micro-batch index) — the same draw as ``algorithms.isopo.Isopo``;
- the EMA is kept simple but follows the specification: one running mean per layer and statistic, fed
  once per micro-batch, folded into the EMA by ``end_step()`` (decay ``cfg.ema_decay``, the first fold sets
  it) and read as the current micro-batch's value before the first fold. Interacting: λ = c_λ·EMA(tr K / B);
- a Linear bias gets the REINFORCE gradient Σ_i A_i Σ_{t∈i} δ_t (as the engine; Qwen3 has no biases);
- a layer that sees only the last T' columns of the (B, T) input (an LM head run from the first response
  column) maps its tokens to those columns; the sampled positions outside them are left out, as in the
  engine's token-layout views (δ is zero there).

Quirks kept from the reference code (they change gradients, not the timing):

- every parameter that is not a Linear weight or bias (norm gains, an untied input embedding) keeps the
  ADVANTAGE-FREE gradient of the loss that was back-propagated — the specification gives them the REINFORCE
  gradient instead;
- a weight shared with another module (a tied LM head / input embedding) is OVERWRITTEN with the Linear's
  Σ_i w_i G_i: the input lookup's gradient is lost.

Usage mirrors the engine::

    hooks = HooksIsopo(model, IsopoConfig(setting="paper"))
    with hooks.installed():
        with hooks.micro_batch(seq_ids, advantages):   # the transform runs when the block exits
            advantage_free_loss.backward()
        hooks.end_step()
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from algorithms.isopo import IsopoConfig, draw_overlap_samples


class _LayerRecord:
    __slots__ = ("a", "d")

    def __init__(self) -> None:
        self.a: torch.Tensor | None = None
        self.d: torch.Tensor | None = None


class _SimpleEma:
    """Per-layer EMA of one statistic (see the module docstring)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.value: dict[str, torch.Tensor] = {}
        self.pending: dict[str, list[torch.Tensor]] = {}

    def read_and_record(self, key: str, current: torch.Tensor) -> torch.Tensor:
        self.pending.setdefault(key, []).append(current.detach())
        return self.value.get(key, current)

    def fold(self) -> None:
        for key, values in self.pending.items():
            mean = torch.stack(values).mean()
            old = self.value.get(key)
            self.value[key] = mean if old is None else self.decay * old + (1.0 - self.decay) * mean
        self.pending.clear()


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


class HooksIsopo:
    def __init__(self, model: nn.Module, cfg: IsopoConfig):
        self.model = model
        self.cfg = cfg
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not self.layers:
            raise ValueError("the hooks baseline found no nn.Linear layer in the model")
        self.records = [_LayerRecord() for _ in self.layers]
        self.emas = [_SimpleEma(cfg.ema_decay) for _ in self.layers]
        self.step = 0
        self._micro_index = 0
        self._handles: list = []
        self._recording = False

    # -- hooks --------------------------------------------------------------------------------------
    def install(self) -> None:
        if self._handles:
            return
        for (_, module), rec in zip(self.layers, self.records):
            self._handles.append(module.register_forward_hook(self._forward_hook(rec)))
            self._handles.append(module.register_full_backward_hook(self._backward_hook(rec)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def installed(self):
        self.install()
        try:
            yield self
        finally:
            self.remove()

    def _forward_hook(self, rec: _LayerRecord):
        def hook(module, args, output):
            if not self._recording or not torch.is_grad_enabled():
                return
            if rec.a is not None:
                raise RuntimeError("the hooks baseline supports one call of each nn.Linear per micro-batch")
            rec.a = args[0].detach()

        return hook

    def _backward_hook(self, rec: _LayerRecord):
        def hook(module, grad_input, grad_output):
            if self._recording:
                rec.d = grad_output[0].detach()

        return hook

    # -- micro-batches and steps --------------------------------------------------------------------
    @contextmanager
    def micro_batch(self, seq_ids: torch.Tensor, advantages: torch.Tensor):
        """seq_ids: sequence of every input position (shape of input_ids), −1 for padding; advantages: one
        per sequence. Run the forward and the backward of the ADVANTAGE-FREE loss inside the block; the Linear
        weight gradients are replaced when it exits."""
        weights = [m.weight for _, m in self.layers]
        # Gradients accumulated by earlier micro-batches: the ordinary backward below must not add into them.
        previous = {id(w): w.grad for w in weights}
        for w in weights:
            w.grad = None
        for rec in self.records:
            rec.a = rec.d = None
        self._recording = True
        ok = False
        try:
            yield
            ok = True
        finally:
            self._recording = False
            try:
                if ok:
                    self._transform(seq_ids, advantages, previous)
            finally:
                for rec in self.records:
                    rec.a = rec.d = None
                self._micro_index += 1

    def end_step(self) -> None:
        for ema in self.emas:
            ema.fold()
        self.step += 1
        self._micro_index = 0

    # -- the transform, layer by layer, sequence by sequence ------------------------------------------
    def _transform(self, seq_ids: torch.Tensor, advantages: torch.Tensor, previous: dict) -> None:
        cfg = self.cfg
        flat_ids = seq_ids.reshape(-1).long()
        valid_pos = (flat_ids >= 0).nonzero().squeeze(1)
        b = advantages.numel()
        seq_pos = [(flat_ids == i).nonzero().squeeze(1) for i in range(b)]
        samples = draw_overlap_samples(valid_pos.numel(), cfg.num_samples, len(self.layers), cfg.seed,
                                       self.step, self._micro_index)
        samples = valid_pos[samples.to(valid_pos.device)]
        done: set[int] = set()
        for li, ((name, module), rec) in enumerate(zip(self.layers, self.records)):
            if rec.a is None or rec.d is None:
                raise RuntimeError(f"hooks baseline: layer {name} saw no forward or backward in this micro-batch")
            d = rec.d.reshape(-1, rec.d.shape[-1])
            a = rec.a.reshape(-1, rec.a.shape[-1]).to(d.dtype)  # autocast: the precision the layer ran in
            layer_seq_pos, layer_sample = seq_pos, samples[li]
            if a.shape[0] != flat_ids.numel():
                inverse = _suffix_inverse(seq_ids.shape, tuple(rec.a.shape[:-1]), name, a.device)
                layer_seq_pos = [_inside(inverse[idx]) for idx in seq_pos]
                layer_sample = _inside(inverse[layer_sample])
            stat = torch.float64 if a.dtype == torch.float64 else torch.float32
            adv = advantages.to(device=a.device, dtype=stat)

            g = [d[idx].t() @ a[idx] for idx in layer_seq_pos]  # G_i = Σ_{t∈i} δ_t a_tᵀ, one sequence at a time
            if cfg.variant == "interacting":
                w = self._interacting(li, g, adv)
            else:
                w = self._non_interacting(li, g, adv, a, d, layer_sample)

            update = torch.zeros_like(g[0])
            for i in range(b):
                update += w[i].to(update.dtype) * g[i]
            weight = module.weight
            update = update.to(weight.dtype)
            # A weight seen twice (shared between Linears) accumulates; a tied embedding's lookup gradient is
            # overwritten (the reference code's quirk).
            if id(weight) in done:
                weight.grad = weight.grad + update
            else:
                prev = previous.get(id(weight))
                weight.grad = update if prev is None else prev + update
                done.add(id(weight))
            if module.bias is not None and module.bias.grad is not None:
                # Biases: REINFORCE, Σ_i A_i Σ_{t∈i} δ_t, replacing this micro-batch's advantage-free part.
                free = sum(d[idx].sum(0) for idx in layer_seq_pos)
                reinforce = sum(adv[i].to(d.dtype) * d[idx].sum(0) for i, idx in enumerate(layer_seq_pos))
                module.bias.grad = module.bias.grad - free.to(module.bias.dtype) + reinforce.to(module.bias.dtype)

    def _non_interacting(self, li, g, adv, a, d, sample) -> torch.Tensor:
        cfg = self.cfg
        stat = adv.dtype
        a_k, d_k = a[sample].to(stat), d[sample].to(stat)
        den = torch.sqrt(((d_k * d_k).sum(1) * (a_k * a_k).sum(1)).sum())
        norms, overlaps = [], []
        for gi in g:
            gi = gi.to(stat)
            norms.append(torch.linalg.vector_norm(gi))
            u = ((d_k @ gi) * a_k).sum(1)  # (δ_kᵀ G_i a_k)_k
            overlaps.append(torch.linalg.vector_norm(u))
        norm = torch.stack(norms)
        overlap = _safe_div(torch.stack(overlaps), den)  # an undefined statistic reads as 0, as in the engine
        ratio = _safe_div(overlap, norm)
        w = adv.clone()
        for x, coeff, exponent, key in ((norm, cfg.c_n, cfg.p, "N"), (overlap, cfg.c_o, cfg.q, "O"),
                                        (ratio, cfg.c_r, cfg.r, "R")):
            mean_sq = (x * x).mean()
            ref = self.emas[li].read_and_record(key, mean_sq)
            if coeff == 0:
                x_reg = x.abs()
            elif cfg.reg_form == "additive":
                x_reg = torch.sqrt(x * x + coeff * ref)
            else:
                x_reg = torch.sqrt(x * x / (coeff * ref) + 1.0)
            if exponent != 0:
                w = w * x_reg**exponent
        return torch.where(torch.isfinite(w), w, torch.zeros_like(w))

    def _interacting(self, li, g, adv) -> torch.Tensor:
        b = len(g)
        flat = torch.stack([gi.reshape(-1).to(adv.dtype) for gi in g])  # (B, out·in): every G_i at once
        ntk = flat @ flat.t()
        del flat
        mean_trace = ntk.diagonal().sum() / b
        lam = self.cfg.c_lambda * self.emas[li].read_and_record("trK", mean_trace)
        eye = torch.eye(b, dtype=ntk.dtype, device=ntk.device)
        w = lam * torch.linalg.solve(ntk + lam * eye, adv.unsqueeze(1)).squeeze(1)
        return torch.where(lam > 0, w, adv)


def _inside(mapped: torch.Tensor) -> torch.Tensor:
    return mapped[mapped >= 0]


def _suffix_inverse(shape: torch.Size, lead: tuple[int, ...], name: str, device) -> torch.Tensor:
    """Input position -> this layer's token, −1 outside, for a layer that saw the last columns of a (B, T)
    input; one clear error for any other shape."""
    if len(shape) != 2 or len(lead) != 2 or lead[0] != shape[0] or not 0 < lead[1] <= shape[1]:
        raise RuntimeError(f"hooks baseline: layer {name} saw activations of leading shape {lead}; it maps only "
                           f"the input's {tuple(shape)} or its last columns")
    rows, cols = shape
    inverse = torch.full((rows, cols), -1, dtype=torch.long, device=device)
    inverse[:, cols - lead[1]:] = torch.arange(rows * lead[1], device=device).view(rows, lead[1])
    return inverse.reshape(-1)
