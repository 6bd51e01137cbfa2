"""CUDA graphs of the small-tensor tail of a layer's ISOPO backward.

On a GPU the tail (statistics from the per-sequence gradients G, weights, the weighted sum Σ_i w_i G_i:
``linear.tail_update``) is ~15 kernels of a few microseconds each, and the host launching them one by one,
~200 layers per backward, set the pace of an eager ISOPO step (BENCHMARKS.md). Captured once per shape,
the tail is one graph launch: G is written by the eager per-sequence-gradient matmul straight into the
graph's static input (``out=``), the sample rows likewise, and the weighted gradient is the graph's static
output, so nothing large is copied in (and out only where autograd would keep it: ``linear._graph_step``).

A ``TailGraph`` holds one capture: its shape's static inputs (``StaticInputs``, held once per shape), the
graph and its outputs. Layers of the same shape share it (the static buffers are overwritten by the next such
layer, after this one's reads on the same stream).
A capture synchronises the device once (``torch.cuda.graph`` does, before it starts); replays never do.
With ``capture=False`` the same buffers are filled and the tail runs eagerly on them — the CPU test of
everything but the capture itself.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch

GRAPHS_KEPT = 32
"""Graphs kept, one per shape and EMA key set (least recently used dropped): each holds its graph's memory,
and a shape's G buffer stays while any of its graphs does."""


class StaticInputs:
    """One shape's static input buffers, shared by its graphs (one per set of EMA keys: before and after the
    first EMA update, say), so that G is held once per shape."""

    def __init__(self, b: int, d_in: int, d_out: int, k: int, dtype: torch.dtype, device: torch.device,
                 adv_dtype: torch.dtype):
        self.g = torch.empty(b, d_out, d_in, dtype=dtype, device=device)
        self.a_k = torch.empty(k, d_in, dtype=dtype, device=device) if k else None
        self.d_k = torch.empty(k, d_out, dtype=dtype, device=device) if k else None
        self.adv = torch.empty(b, dtype=adv_dtype, device=device)
        self._adv_source: tuple[weakref.ref, int] | None = None

    def load_advantages(self, adv: torch.Tensor) -> None:
        """Copy the advantages, once per micro-batch: every layer of a micro-batch reads the same tensor."""
        last = self._adv_source
        # A weak reference, not id(): a new micro-batch's tensor may reuse a freed one's address.
        if last is None or last[0]() is not adv or last[1] != adv._version:
            self.adv.copy_(adv)
            self._adv_source = (weakref.ref(adv), adv._version)


class TailGraph:
    """One capture: the shape's static inputs, this EMA key set's static EMAs, and once captured the graph
    and its outputs."""

    def __init__(self, key: tuple, inputs: StaticInputs, ema_keys: tuple[str, ...], stat_dtype: torch.dtype):
        self.key = key
        self.inputs = inputs
        self.ema = {key: torch.empty((), dtype=stat_dtype, device=inputs.g.device) for key in ema_keys}
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

    def load(self, adv: torch.Tensor, ema: Mapping[str, torch.Tensor]) -> None:
        """The advantages and this layer's EMAs into the static inputs (G and the samples are written there
        by the caller's ``out=`` operations)."""
        self.inputs.load_advantages(adv)
        for key, value in ema.items():
            self.ema[key].copy_(value)

    def run(self, tail: Callable, capture: bool):
        """The tail's outputs for the loaded inputs (static tensors: read them before this shape's next
        layer runs)."""
        if not capture:
            return self._call(tail)
        if self.graph is None:
            self._capture(tail)
        self.graph.replay()
        return self.outputs

    def _call(self, tail: Callable):
        return tail(self.inputs.g, self.inputs.a_k, self.inputs.d_k, self.inputs.adv, self.ema)

    def _capture(self, tail: Callable) -> None:
        device = self.inputs.g.device
        # Warm up on a side stream first (cuBLAS and cuSOLVER set up their handles and workspaces outside
        # the capture), as the CUDA graphs documentation prescribes.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._call(tail)
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

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, b: int, d_in: int, d_out: int, k: int, dtype: torch.dtype, device: torch.device,
            adv: torch.Tensor, ema: Mapping[str, torch.Tensor], stat_dtype: torch.dtype) -> TailGraph:
        shape = (b, d_in, d_out, k, dtype, device, adv.dtype)
        key = (shape, tuple(sorted(ema)))
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        inputs = self._inputs.get(shape)
        if inputs is None:
            inputs = self._inputs[shape] = StaticInputs(b, d_in, d_out, k, dtype, device, adv.dtype)
        graph = self._graphs[key] = TailGraph(key, inputs, key[1], stat_dtype)
        while len(self._graphs) > self.kept:
            (old_shape, _), _ = self._graphs.popitem(last=False)
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

    def give_up(self, error: Exception) -> None:
        """A capture failed: this engine's layers run eagerly from now on."""
        self.failed = True
        self._graphs.clear()
        self._inputs.clear()
        warnings.warn(f"ISOPO: capturing a CUDA graph failed ({type(error).__name__}: {error}); running the "
                      "layers eagerly", RuntimeWarning, stacklevel=3)
