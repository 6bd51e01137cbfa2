"""CUDA graphs of the small-tensor tail of a layer's ISOPO backward.

On a GPU the tail (statistics from the per-sequence gradients G, weights, the weighted sum Σ_i w_i G_i:
``linear.tail_update``) is ~15 kernels of a few microseconds each, and the host launching them one by one,
~200 layers per backward, set the pace of an eager ISOPO step (BENCHMARKS.md). Captured once per shape,
the tail is one graph launch: G is written by the eager per-sequence-gradient matmul straight into the
graph's static input (``out=``), the sample rows likewise, and the weighted gradient is the graph's static
output, so nothing large is copied in (and out only where autograd would keep it: ``linear._graph_step``).

A ``TailGraph`` holds one capture: its shape's static inputs (``StaticInputs``, held once per shape), the
graph and its outputs. Layers of the same shape share it (the static buffers are overwritten by the next such
layer, after this one's reads on the same stream). The per-layer numbers, the EMAs a layer's tail reads and
the statistics it records, go through slots indexed by a cursor that the graph advances itself: the host
fills them for a whole step at its end (``TailGraphs.collect`` and ``refresh``), not with a copy per layer.
A capture synchronises the device once (``torch.cuda.graph`` does, before it starts); replays never do.
With ``capture=False`` the same buffers are filled and the tail runs eagerly on them — the CPU test of
everything but the capture itself.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from .batch import to_device

if TYPE_CHECKING:
    from .weights import LayerEma

GRAPHS_KEPT = 32
"""Graphs kept, one per shape and EMA key set (least recently used dropped): each holds its graph's memory,
and a shape's G buffer stays while any of its graphs does."""


SLOTS = 4096
"""Visits of one graph per step (layers of its shape × micro-batches) that read their EMAs and record their
statistics through slots; later visits of a step take the eager path."""


class StaticInputs:
    """One shape's static input buffers, shared by its graphs (one per set of EMA keys: before and after the
    first EMA update, say), so that G is held once per shape."""

    def __init__(self, b: int, d_in: int, d_out: int, k: int, dtype: torch.dtype, device: torch.device,
                 adv_dtype: torch.dtype, form_tiles: int = 0):
        self.g = torch.empty(b, d_out, d_in, dtype=dtype, device=device)
        self.a_k = torch.empty(k, d_in, dtype=dtype, device=device) if k else None
        self.d_k = torch.empty(k, d_out, dtype=dtype, device=device) if k else None
        # With G formed by kernels.form_and_gram_parts: the Gram partials it writes beside G (the tail reads
        # them instead of G for the NTK) and its per-tile counters, which it leaves at zero.
        self.form_parts = torch.empty(form_tiles, b, b, dtype=torch.float32, device=device) if form_tiles else None
        self.form_arrivals = torch.zeros(form_tiles, dtype=torch.int32, device=device) if form_tiles else None
        self.adv = torch.empty(b, dtype=adv_dtype, device=device)
        self._adv_source: tuple[weakref.ref, int] | None = None

    def load_advantages(self, adv: torch.Tensor) -> None:
        """Copy the advantages, once per micro-batch: every layer of a micro-batch reads the same tensor."""
        last = self._adv_source
        # A weak reference, not id(): a new micro-batch's tensor may reuse a freed one's address.
        if last is None or last[0]() is not adv or last[1] != adv._version:
            self.adv.copy_(adv)
            self._adv_source = (weakref.ref(adv), adv._version)


class Visit(Mapping[str, torch.Tensor]):
    """What a tail run from a graph reads its EMAs through: a mapping of each EMA to the value in this visit's
    slot (a one-element gather per read, inside the graph). A kernel that reads and records at the cursor in
    its own program takes the slot arrays instead (``ema_slots``, ``record_slot``, ``cursor``) and marks the
    visit ``advanced`` once it has moved the cursor on."""

    def __init__(self, graph: TailGraph):
        self.graph = graph
        self.advanced = False

    @property
    def cursor(self) -> torch.Tensor:
        return self.graph.cursor

    @property
    def ema_slots(self) -> dict[str, torch.Tensor]:
        return self.graph.ema_slots

    def record_slot(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        return self.graph.record_slot(key, dtype)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.graph.ema_slots[key].index_select(0, self.graph.cursor).view(())

    def __iter__(self):
        return iter(self.graph.ema_slots)

    def __len__(self) -> int:
        return len(self.graph.ema_slots)


class TailGraph:
    """One capture: the shape's static inputs, the slots of this EMA key set's visits, and once captured the
    graph and its outputs."""

    def __init__(self, key: tuple, inputs: StaticInputs, ema_keys: tuple[str, ...], stat_dtype: torch.dtype):
        self.key = key
        self.inputs = inputs
        device = inputs.g.device
        # One slot per visit of a step (a layer's backward through this graph): the EMAs the visit reads and
        # the statistics it records, at the position of a cursor that the tail itself advances. A replay
        # thus needs no copy of its own: the EMAs are written into the slots at the end of the step for the
        # layers that visited them (the next step visits in the same order), and the records are summed per
        # layer there (``collect``), not copied out one by one.
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)
        self.visits = 0
        """The host's count of this step's visits: the cursor's value, without reading the device."""
        self.owners: list[LayerEma] = []
        """Whose EMAs each slot holds (the layer that visited that position, as of the last refresh)."""
        self.ema_slots = {k: torch.zeros(SLOTS, dtype=stat_dtype, device=device) for k in ema_keys}
        self.record_slots: dict[str, torch.Tensor] = {}
        """Made on the first (eager) call, from the statistics the tail records (``record_slot``)."""
        self.ema_copies = 0
        """EMA values copied into a slot one by one (a visit in a new order), for the tests."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None

    @property
    def g(self) -> torch.Tensor:
        return self.inputs.g

    @property
    def a_k(self) -> torch.Tensor | None:
        return self.inputs.a_k

    @property
    def d_k(self) -> torch.Tensor | None:
        return self.inputs.d_k

    def has_slot(self) -> bool:
        return self.visits < SLOTS

    def load(self, adv: torch.Tensor, ema: LayerEma) -> None:
        """The advantages, and this layer's EMAs into the next visit's slot unless it holds them already (G and
        the samples are written by the caller's ``out=`` operations)."""
        self.inputs.load_advantages(adv)
        pos = self.visits
        if pos < len(self.owners) and self.owners[pos] is ema:
            return  # the same layer as last step: its slot was refreshed at the step's end
        if pos < len(self.owners):
            self.owners[pos] = ema
        else:
            self.owners.append(ema)
        for key, slots in self.ema_slots.items():
            slots[pos].copy_(ema.value[key])
        self.ema_copies += bool(self.ema_slots)

    def run(self, tail: Callable, capture: bool):
        """The tail's outputs for the loaded inputs (static tensors: read them before this shape's next
        layer runs)."""
        outputs = self._replay(tail, capture)
        self.visits += 1
        return outputs

    def _replay(self, tail: Callable, capture: bool):
        if not capture:
            return self._call(tail)
        if self.graph is None:
            self._capture(tail)
        self.graph.replay()
        return self.outputs

    def _call(self, tail: Callable):
        visit = Visit(self)
        inputs = self.inputs
        extra = {} if inputs.form_parts is None else {"parts": inputs.form_parts}
        w, grad, recorded = tail(inputs.g, inputs.a_k, inputs.d_k, inputs.adv, visit, **extra)
        for key, value in recorded.items():
            self.record_slot(key, value.dtype).index_copy_(0, self.cursor, value.reshape(1))
        # Without slots the cursor is never read: its increment would be a kernel of every replay for nothing
        # (a configuration records the same keys at every visit, so this holds from the first one on).
        if not visit.advanced and (self.ema_slots or self.record_slots):
            self.cursor.add_(1)
        return w, grad, recorded

    def record_slot(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The slots of a recorded statistic, made on its first record (the warm-up before a capture: never
        inside one, where the zero fill would join the graph)."""
        slots = self.record_slots.get(key)
        if slots is None:
            slots = self.record_slots[key] = torch.zeros(SLOTS, dtype=dtype, device=self.cursor.device)
        return slots

    def collect(self) -> None:
        """This step's records into each visiting layer's EMA sums (``LayerEma.add``): per statistic, one
        gather-free segment sum over the slots used, then a view per layer."""
        if not self.visits or not self.record_slots:
            return
        owners = self.owners[: self.visits]
        index: dict[int, int] = {}
        firsts: list[LayerEma] = []
        segment = []
        for ema in owners:
            if id(ema) not in index:
                index[id(ema)] = len(firsts)
                firsts.append(ema)
            segment.append(index[id(ema)])
        counts = [0] * len(firsts)
        for u in segment:
            counts[u] += 1
        device = self.cursor.device
        seg = to_device(torch.tensor(segment), device)
        for key, slots in self.record_slots.items():
            sums = torch.zeros(len(firsts), dtype=slots.dtype, device=device).index_add_(0, seg, slots[: self.visits])
            for ema, total, count in zip(firsts, sums.unbind(), counts):
                ema.add(key, total, count)

    def refresh(self) -> None:
        """At the end of a step, after the EMA update: each slot this step visited gets its layer's new EMAs
        (one copy per statistic for all of them; slots past them are forgotten), and the cursor goes back to
        the first slot. A graph this step did not visit forgets every slot instead: its EMAs are stale."""
        n = self.visits
        del self.owners[n:]
        if n:
            for key, slots in self.ema_slots.items():
                slots[:n].copy_(torch.stack([ema.value[key] for ema in self.owners]))
            self.cursor.zero_()
            self.visits = 0

    def _capture(self, tail: Callable) -> None:
        device = self.inputs.g.device
        # Warm up on a side stream first (cuBLAS and cuSOLVER set up their handles and workspaces outside
        # the capture), as the CUDA graphs documentation prescribes.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        cursor = self.cursor.clone()
        with torch.cuda.stream(side):
            self._call(tail)
            self.cursor.copy_(cursor)  # the warm-up's visit does not count: the replay makes it
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the capture runs on autograd's backward thread.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self._call(tail)
        self.graph, self.outputs = graph, outputs


class TailGraphs:
    """The captures of one ISOPO engine, by shape and EMA keys (least recently used dropped beyond
    ``GRAPHS_KEPT``, and a shape's buffers with its last graph). ``capture=False`` runs the tails eagerly
    on the same static buffers."""

    def __init__(self, capture: bool = True, kept: int = GRAPHS_KEPT):
        self.capture = capture
        self.kept = kept
        self.failed = False
        self._graphs: OrderedDict[tuple, TailGraph] = OrderedDict()
        self._inputs: dict[tuple, StaticInputs] = {}
        self._dropped: list[TailGraph] = []
        """Graphs dropped (evicted, or all of them on a failed capture) after this step visited them: their
        records are still to be collected at the step's end."""

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, b: int, d_in: int, d_out: int, k: int, dtype: torch.dtype, device: torch.device,
            adv: torch.Tensor, ema: Mapping[str, torch.Tensor], stat_dtype: torch.dtype,
            form_tiles: int = 0) -> TailGraph:
        """form_tiles: G comes from ``kernels.form_and_gram_parts`` with that many Gram partials (0: from a
        batched matmul)."""
        shape = (b, d_in, d_out, k, dtype, device, adv.dtype, form_tiles)
        key = (shape, tuple(sorted(ema)))
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        inputs = self._inputs.get(shape)
        if inputs is None:
            inputs = self._inputs[shape] = StaticInputs(b, d_in, d_out, k, dtype, device, adv.dtype, form_tiles)
        graph = self._graphs[key] = TailGraph(key, inputs, key[1], stat_dtype)
        while len(self._graphs) > self.kept:
            (old_shape, _), old = self._graphs.popitem(last=False)
            if old.visits:
                self._dropped.append(old)
            if all(s != old_shape for s, _ in self._graphs):
                del self._inputs[old_shape]
        return graph

    def touch(self, graph: TailGraph) -> bool:
        """Whether ``graph`` is still held (it counts as just used if so): a layer that kept the graph it
        used last time checks it thus, instead of looking it up by shape again."""
        if self._graphs.get(graph.key) is not graph:
            return False
        self._graphs.move_to_end(graph.key)
        return True

    def collect(self) -> None:
        """At the step's end, before the EMA update: every visit's records into its layer's EMA sums (graphs
        dropped during the step included)."""
        for graph in [g for g in self._graphs.values() if g.visits] + self._dropped:
            graph.collect()
        self._dropped = []

    def refresh(self) -> None:
        """At the step's end, after the EMA update: every held graph's slots refreshed (or forgotten, where this
        step did not visit it) and its cursor rewound."""
        for graph in self._graphs.values():
            graph.refresh()

    def give_up(self, error: Exception) -> None:
        """A capture failed: this engine's layers run eagerly from now on."""
        self.failed = True
        self._dropped.extend(g for g in self._graphs.values() if g.visits)
        self._graphs.clear()
        self._inputs.clear()
        warnings.warn(f"ISOPO: capturing a CUDA graph failed ({type(error).__name__}: {error}); running the "
                      "layers eagerly", RuntimeWarning, stacklevel=3)
