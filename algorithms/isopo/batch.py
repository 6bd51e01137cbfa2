"""What one micro-batch tells every layer's backward: which token belongs to which sequence, the
sequences' advantages, and the overlap sample of each layer.

Everything that needs the host (counting valid tokens, drawing the samples) happens here, once, before the
forward pass — so that no layer's backward has to synchronise with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def draw_overlap_samples(n_valid: int, k: int, n_layers: int, seed: int, step: int, micro: int) -> torch.Tensor:
    """Indices into the micro-batch's valid tokens (row-major order), K per layer, without replacement.

    One generator per (seed, step, micro-batch), drawn in layer order: the same run draws the same
    positions, and a test can recompute them with this function.
    """
    gen = torch.Generator().manual_seed(_mix(seed, step, micro))
    k = min(k, n_valid)
    return torch.stack([torch.randperm(n_valid, generator=gen)[:k] for _ in range(n_layers)])


def _mix(*values: int) -> int:
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class MicroBatch:
    """Per-token bookkeeping of one micro-batch, shared by every patched layer."""

    seq_ids: torch.Tensor
    """Sequence of each token position (the activations' leading shape); -1 marks padding."""
    advantages: torch.Tensor
    """A_i, one per sequence."""
    num_seqs: int
    """B, the number of sequences."""
    token_mask: torch.Tensor
    """(n_tokens,) 1.0 at valid positions, flattened row-major."""
    has_padding: bool
    """Whether any position is padding (when none is, the backward skips every masking step)."""
    token_adv: torch.Tensor
    """(n_tokens,) A_{s(t)} at valid positions and 0 at padding: the REINFORCE per-token gradient scale."""
    token_seq: torch.Tensor
    """(n_tokens,) sequence of each position, padding mapped to 0 (always used together with token_mask)."""
    samples: torch.Tensor
    """(n_layers, K) flat token positions of each layer's overlap sample."""
    pad_index: torch.Tensor | None
    """(B, T_max) flat position of each sequence's tokens, n_tokens where padded; None when each row of a
    2-D layout is exactly one sequence (row r holds sequence r), the common case that needs no gather."""
    seq_len_max: int
    """T_max, the longest sequence (the padded per-sequence length used by the statistics)."""
    index: int
    """Micro-batch number within the current optimizer step."""

    @classmethod
    def build(
        cls,
        seq_ids: torch.Tensor,
        advantages: torch.Tensor,
        *,
        n_layers: int,
        k: int,
        seed: int,
        step: int,
        index: int,
        dtype: torch.dtype,
    ) -> MicroBatch:
        seq_ids = seq_ids.long()
        advantages = advantages.reshape(-1)
        device = seq_ids.device
        flat = seq_ids.reshape(-1)
        valid = flat >= 0
        num_seqs = advantages.numel()
        if num_seqs == 0 or not bool(valid.any()):
            raise ValueError("an ISOPO micro-batch needs at least one sequence with one valid token")
        if int(flat.max()) >= num_seqs:
            raise ValueError(
                f"seq_ids name sequence {int(flat.max())} but only {num_seqs} advantages were given"
            )
        valid_pos = valid.nonzero().squeeze(1)
        valid_seq = flat[valid_pos]
        counts = torch.bincount(valid_seq, minlength=num_seqs)
        if bool((counts == 0).any()):
            raise ValueError("every sequence of an ISOPO micro-batch needs at least one valid token")
        seq_len_max = int(counts.max())

        adv = advantages.to(device=device, dtype=dtype)
        token_adv = torch.where(valid, adv[flat.clamp(min=0)], torch.zeros((), dtype=dtype, device=device))

        rows = torch.arange(seq_ids.shape[0], device=device).unsqueeze(1) if seq_ids.dim() == 2 else None
        row_layout = (
            rows is not None
            and seq_ids.shape[0] == num_seqs
            and bool(((seq_ids == rows) | (seq_ids < 0)).all())
        )
        pad_index = None
        if not row_layout:
            # Scatter each sequence's tokens, in order, into a (B, T_max) table of flat positions.
            order = torch.argsort(valid_seq, stable=True)
            sorted_seq = valid_seq[order]
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(sorted_seq.numel(), device=device) - starts[sorted_seq]
            pad_index = torch.full((num_seqs, seq_len_max), flat.numel(), dtype=torch.long, device=device)
            pad_index[sorted_seq, slot] = valid_pos[order]

        n_valid = valid_pos.numel()
        sample_rank = draw_overlap_samples(n_valid, k, n_layers, seed, step, index).to(device)
        return cls(
            seq_ids=seq_ids,
            advantages=adv,
            num_seqs=num_seqs,
            token_mask=valid.to(dtype),
            has_padding=valid_pos.numel() < flat.numel(),
            token_adv=token_adv,
            token_seq=flat.clamp(min=0),
            samples=valid_pos[sample_rank],
            pad_index=pad_index,
            seq_len_max=seq_len_max if pad_index is not None else seq_ids.shape[-1],
            index=index,
        )
