"""What one micro-batch tells every layer's backward: which token belongs to which sequence, the
sequences' advantages, and the overlap sample of each layer.

Everything that needs the host (counting valid tokens, drawing the samples) works on a host copy of the
sequence ids, taken once when the micro-batch is built: no layer's backward synchronises with the device,
and building one costs a single device-to-host copy instead of a synchronisation per check.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch._C._autograd import _profiler_enabled
from torch.profiler import record_function


def draw_overlap_samples(n_valid: int, k: int, n_layers: int, seed: int, step: int, micro: int) -> torch.Tensor:
    """(n_layers, K) indices into the micro-batch's valid tokens (row-major order), K per layer without
    replacement: each row a uniformly random K-subset, in random order (K = n_valid where fewer).

    One generator per (seed, step, micro-batch): the same run draws the same positions, and a test can
    recompute them with this function. Every layer is drawn at once, in a few array operations: a draw per
    layer (NumPy's ``choice``) cost the host ~25 µs of call overhead each, ~5 ms for the 197 layers of a
    Qwen3-0.6B micro-batch, inside the backward that a GPU waits on.
    """
    rng = np.random.Generator(np.random.PCG64(_mix(seed, step, micro)))
    k = min(k, n_valid)
    dense = 2 * k > n_valid  # rejection (below) would redraw too often: rank every token instead
    draw, width = (_ranked_first, n_valid) if dense else (_first_distinct, _first_width(n_valid, k))
    per_block = max(1, 2**22 // width)  # layers drawn together: ~32 MB of draws at most
    return torch.from_numpy(np.concatenate([draw(rng, n_valid, k, min(per_block, n_layers - start))
                                            for start in range(0, n_layers, per_block)]))


def _ranked_first(rng: np.random.Generator, n: int, k: int, rows: int) -> np.ndarray:
    """(rows, k): per row, the first k of a uniformly random ranking of [0, n)."""
    return np.argsort(rng.random((rows, n)), axis=1)[:, :k]


def _first_width(n: int, k: int) -> int:
    """Draws per row to start with: a little over the n·ln(n / (n − k)) that k distinct values take on
    average."""
    return k + 16 + 2 * k * k // n


def _first_distinct(rng: np.random.Generator, n: int, k: int, rows: int) -> np.ndarray:
    """(rows, k): per row, the first k distinct values of a sequence of independent uniform draws from
    [0, n) — a uniform k-subset in uniform random order, i.e. a draw without replacement. For k ≤ n / 2 a
    row needs n·ln(n / (n − k)) ≤ 1.39 k draws on average; rows short of k distinct values get more."""
    width = _first_width(n, k)
    draws = rng.integers(0, n, (rows, width))
    while True:
        m = draws.shape[1]
        shift = (m - 1).bit_length()
        # Sorting (value, position) pairs puts each value's first occurrence at the head of its run.
        pairs = np.sort((draws << shift) | np.arange(m), axis=1)
        head = np.ones(pairs.shape, dtype=bool)
        np.not_equal(pairs[:, 1:] >> shift, pairs[:, :-1] >> shift, out=head[:, 1:])
        first = np.zeros(rows * m, dtype=bool)
        first[((pairs & ((1 << shift) - 1)) + (np.arange(rows) * m)[:, None])[head]] = True
        first = first.reshape(rows, m)
        if (first.sum(1) >= k).all():
            break
        draws = np.concatenate([draws, rng.integers(0, n, (rows, width))], axis=1)
    keep = first & (np.cumsum(first, axis=1) <= k)
    return draws[keep].reshape(rows, k)


def _mix(*values: int) -> int:
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto ``device`` without making the host wait: a blocking host-to-CUDA copy would
    synchronise the stream, so it goes through pinned memory as a non-blocking copy."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_NO_REGION = nullcontext()


def host_region(name: str):
    """A named region of ISOPO's host work in a profile (``record_function``; ``bench.gaps`` reports the GPU's
    idle time that overlaps it), and nothing when no profiler runs: a region costs the host ~10 µs even then."""
    return record_function(name) if _profiler_enabled() else _NO_REGION


class LayerSamples:
    """Each layer's overlap-sample positions in one layout, made on first use.

    First use is the first ISOPO layer's backward: the host then draws while the device is still busy with
    the forward pass, instead of before the step's first kernel, and every layer's positions travel to the
    device in one copy. ``make`` returns them as one flat host tensor and each layer's count; ``host()`` gives
    them without touching the device.
    """

    def __init__(self, make: Callable[[], tuple[torch.Tensor, list[int]]], device: torch.device):
        self._make = make
        self._device = device
        self._host: tuple[torch.Tensor, list[int]] | None = None
        self._on_device: list[torch.Tensor] | None = None

    def host(self) -> tuple[torch.Tensor, list[int]]:
        """(every layer's positions, concatenated in layer order; the count of each layer's)."""
        if self._host is None:
            with host_region("isopo::draw_samples"):
                self._host = self._make()
        return self._host

    def __getitem__(self, layer: int) -> torch.Tensor:
        if self._on_device is None:
            flat, counts = self.host()
            with host_region("isopo::samples_to_device"):
                self._on_device = list(torch.split(to_device(flat, self._device), counts))
        return self._on_device[layer]

    def __len__(self) -> int:
        return len(self.host()[1])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def total(self) -> int:
        """Sampled positions over all layers."""
        return self.host()[0].numel()


@dataclass
class TokenLayout:
    """How one activation shape maps its positions to sequences.

    The micro-batch's input has the main layout; a layer may see another one (a view): the trainer's LM
    head, for instance, runs only from the first response column. Every field is indexed by the positions of
    THIS layout, flattened row-major.
    """

    shape: tuple[int, ...]
    """The activations' leading shape in this layout."""
    token_mask: torch.Tensor
    """(n_tokens,) 1.0 at valid positions."""
    has_padding: bool
    """Whether any position is padding (when none is, the backward skips every masking step)."""
    token_adv: torch.Tensor
    """(n_tokens,) A_{s(t)} at valid positions and 0 at padding: the REINFORCE per-token gradient scale."""
    token_seq: torch.Tensor
    """(n_tokens,) sequence of each position, padding mapped to 0 (always used together with token_mask)."""
    samples: LayerSamples
    """Positions of each layer's overlap sample, indexed by layer (K each in the main layout). A view
    keeps, per layer, only the sampled positions it shows: a sampled token outside it has δ = 0 in this
    layer, so it adds nothing to the overlap's numerator or denominator, and dropping it before the
    backward saves its share of the overlap matmul with no data-dependent shape inside the backward."""
    main_samples: LayerSamples | None
    """The main layout's samples, which a view's are mapped from (None for the main layout itself)."""
    pad_index: torch.Tensor | None
    """(B, T_max) position of each sequence's tokens, n_tokens where padded; None when each row of a
    2-D layout is exactly one sequence (row r holds sequence r), the common case that needs no gather."""
    seq_len_max: int
    """T_max, the per-sequence length the statistics use (the row length when pad_index is None)."""

    @property
    def n_tokens(self) -> int:
        return self.token_mask.numel()

    @property
    def samples_dropped(self) -> int:
        """How many sampled positions, over all layers, this view left out (0 for the main layout)."""
        return 0 if self.main_samples is None else self.main_samples.total - self.samples.total


def _layout(seq_ids: torch.Tensor, seq_host: torch.Tensor, advantages: torch.Tensor, counts: torch.Tensor,
            samples: LayerSamples, main_samples: LayerSamples | None) -> TokenLayout:
    """The bookkeeping of one layout: seq_ids on the device, seq_host its host copy, counts = valid tokens
    per sequence (host)."""
    device, dtype = seq_ids.device, advantages.dtype
    num_seqs = advantages.numel()
    flat = seq_ids.reshape(-1)
    valid = flat >= 0
    token_adv = torch.where(valid, advantages[flat.clamp(min=0)], torch.zeros((), dtype=dtype, device=device))
    flat_host = seq_host.reshape(-1)
    valid_host = flat_host >= 0
    row_layout = seq_host.dim() == 2 and seq_host.shape[0] == num_seqs and bool(
        ((seq_host == torch.arange(num_seqs).unsqueeze(1)) | (seq_host < 0)).all()
    )
    pad_index = None
    seq_len_max = seq_host.shape[-1]
    if not row_layout:
        # Scatter each sequence's tokens, in order, into a (B, T_max) table of flat positions.
        valid_pos = valid_host.nonzero().squeeze(1)
        valid_seq = flat_host[valid_pos]
        seq_len_max = int(counts.max())
        order = torch.argsort(valid_seq, stable=True)
        sorted_seq = valid_seq[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(sorted_seq.numel()) - starts[sorted_seq]
        table = torch.full((num_seqs, seq_len_max), flat_host.numel(), dtype=torch.long)
        table[sorted_seq, slot] = valid_pos[order]
        pad_index = to_device(table, device)
    return TokenLayout(
        shape=tuple(seq_ids.shape),
        token_mask=valid.to(dtype),
        has_padding=not bool(valid_host.all()),
        token_adv=token_adv,
        token_seq=flat.clamp(min=0),
        samples=samples,
        main_samples=main_samples,
        pad_index=pad_index,
        seq_len_max=seq_len_max,
    )


@dataclass
class MicroBatch:
    """Per-token bookkeeping of one micro-batch, shared by every patched layer."""

    seq_ids: torch.Tensor
    """Sequence of each input position (the main layout's shape); -1 marks padding."""
    seq_host: torch.Tensor
    """seq_ids on the host."""
    advantages: torch.Tensor
    """A_i, one per sequence."""
    num_seqs: int
    """B, the number of sequences."""
    index: int
    """Micro-batch number within the current optimizer step."""
    layouts: list[TokenLayout]
    """The main layout first, then the views added with ``add_view``."""

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
        seq_host = seq_ids.cpu()
        flat = seq_host.reshape(-1)
        valid = flat >= 0
        num_seqs = advantages.numel()
        if num_seqs == 0 or not bool(valid.any()):
            raise ValueError("an ISOPO micro-batch needs at least one sequence with one valid token")
        if int(flat.max()) >= num_seqs:
            raise ValueError(
                f"seq_ids name sequence {int(flat.max())} but only {num_seqs} advantages were given"
            )
        valid_pos = valid.nonzero().squeeze(1)
        counts = torch.bincount(flat[valid_pos], minlength=num_seqs)
        if bool((counts == 0).any()):
            raise ValueError("every sequence of an ISOPO micro-batch needs at least one valid token")

        def draw() -> tuple[torch.Tensor, list[int]]:
            rows = valid_pos[draw_overlap_samples(valid_pos.numel(), k, n_layers, seed, step, index)]
            return rows.reshape(-1), [rows.shape[1]] * n_layers

        adv = advantages.to(device=device, dtype=dtype)
        main = _layout(seq_ids, seq_host, adv, counts, LayerSamples(draw, device), None)
        return cls(seq_ids=seq_ids, seq_host=seq_host, advantages=adv, num_seqs=num_seqs, index=index, layouts=[main])

    @property
    def main(self) -> TokenLayout:
        return self.layouts[0]

    def add_view(self, positions: torch.Tensor) -> TokenLayout:
        """Register another layout: ``positions`` (any shape) holds, for each of its positions, the flat
        index of the main-layout position it shows. Layers whose activations have ``positions.shape`` as
        leading shape then use it. Positions left out must carry no gradient (δ = 0 there), as the prompt
        columns before the first response token do for the LM head."""
        pos_host = positions.cpu().long()
        shape = tuple(pos_host.shape)
        n_main = self.main.n_tokens
        if any(layout.shape == shape for layout in self.layouts):
            raise ValueError(f"an ISOPO micro-batch already has a token layout of shape {shape}")
        flat_pos = pos_host.reshape(-1)
        if flat_pos.numel() == 0 or int(flat_pos.min()) < 0 or int(flat_pos.max()) >= n_main:
            raise ValueError(f"view positions must lie in [0, {n_main}), the main layout's positions")
        if int(torch.bincount(flat_pos, minlength=n_main).max()) > 1:
            raise ValueError("view positions must not repeat a position")
        view_host = self.seq_host.reshape(-1)[flat_pos].view(shape)
        valid = view_host.reshape(-1) >= 0
        if not bool(valid.any()):
            raise ValueError("an ISOPO view needs at least one valid token")
        counts = torch.bincount(view_host.reshape(-1)[valid], minlength=self.num_seqs)
        # Main position -> view position, -1 outside the view.
        inverse = torch.full((n_main,), -1, dtype=torch.long)
        inverse[flat_pos] = torch.arange(flat_pos.numel())
        main_samples = self.main.samples

        def keep_inside() -> tuple[torch.Tensor, list[int]]:
            main_flat, main_counts = main_samples.host()
            mapped = inverse[main_flat.view(len(main_counts), -1)]  # (n_layers, K): every main row has K positions
            inside = mapped >= 0
            return mapped[inside], inside.sum(1).tolist()

        device = self.seq_ids.device
        view_seq = to_device(view_host, device)
        layout = _layout(view_seq, view_host, self.advantages, counts, LayerSamples(keep_inside, device),
                         main_samples)
        self.layouts.append(layout)
        return layout

    def layout_shapes(self) -> str:
        """The layouts' shapes, for error messages."""
        return ", ".join(str(layout.shape) for layout in self.layouts)

    def layout_for(self, lead_shape: torch.Size | tuple[int, ...]) -> TokenLayout | None:
        """The layout whose shape is exactly ``lead_shape``, or None."""
        lead_shape = tuple(lead_shape)
        for layout in self.layouts:
            if layout.shape == lead_shape:
                return layout
        return None

    def layout_prefix_of(self, shape: torch.Size | tuple[int, ...]) -> TokenLayout | None:
        """The layout whose shape starts ``shape`` (e.g. (B, T) for per-head activations (B, T, H, D))."""
        shape = tuple(shape)
        for layout in self.layouts:
            if shape[: len(layout.shape)] == layout.shape:
                return layout
        return None
