"""Installs ISOPO into a model and drives it micro-batch by micro-batch.

    isopo = Isopo(model, IsopoConfig(setting="paper"))
    with isopo.installed():
        for mb in micro_batches:
            with isopo.micro_batch(seq_ids, advantages):
                advantage_free_loss(model, mb).backward()
        isopo.end_step()      # once per optimizer step: folds this step's statistics into the EMAs
        optimizer.step()

The loss to backpropagate is the ADVANTAGE-FREE one, −agg_t log π(y_t), with the aggregation and scale the
REINFORCE loss would use; every nn.Linear weight then receives Σ_i w_i G_i and every other parameter the
REINFORCE gradient Σ_i A_i g_i.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .batch import MicroBatch, host_region
from .config import IsopoConfig
from .graphs import TailGraphs
from .linear import apply_isopo_linear
from .params import ReinforceGainForward, ReinforceParamsForward, is_gain_module
from .weights import LayerEma, update_emas


@dataclass
class LinearLayer:
    """ISOPO's per-layer state."""

    index: int
    name: str
    module: nn.Linear
    cfg: IsopoConfig
    ema: LayerEma
    plans: dict = field(default_factory=dict, repr=False)
    """(B, T, K, dtype, device) → the statistics strategy and chunking chosen for that shape."""
    graphs: TailGraphs | None = field(default=None, repr=False)
    """The engine's CUDA graphs of layer tails (``IsopoConfig.cuda_graphs``), shared by its layers."""


class Isopo:
    def __init__(self, model: nn.Module, cfg: IsopoConfig):
        self.model = model
        self.cfg = cfg
        self.graphs = TailGraphs() if cfg.graphs_enabled else None
        self.layers = [
            LinearLayer(i, name, module, cfg, LayerEma(cfg.ema_decay), graphs=self.graphs)
            for i, (name, module) in enumerate(
                (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
            )
        ]
        if not self.layers:
            raise ValueError("ISOPO found no nn.Linear layer in the model")
        self.step = 0
        self._micro_index = 0
        self._active: MicroBatch | None = None
        # (module, the instance-level forward it had before, if any) so that removal restores it exactly.
        self._patched: list[tuple[nn.Module, object]] = []

    # -- installation -------------------------------------------------------------------------------
    def install(self) -> None:
        if self._patched:
            return
        for layer in self.layers:
            self._patched.append((layer.module, vars(layer.module).get("forward")))
            layer.module.forward = types.MethodType(_make_linear_forward(self, layer), layer.module)
        linear_ids = {id(layer.module) for layer in self.layers}
        for module in self.model.modules():
            if id(module) in linear_ids:
                continue
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self._patched.append((module, vars(module).get("forward")))
                replacement = ReinforceGainForward if is_gain_module(module) else ReinforceParamsForward
                module.forward = replacement(module, module.forward, self.active)

    def remove(self) -> None:
        for module, previous in reversed(self._patched):
            if previous is None:
                del module.forward  # the class's forward shows through again
            else:
                module.forward = previous
        self._patched.clear()

    @contextmanager
    def installed(self):
        self.install()
        try:
            yield self
        finally:
            self.remove()

    # -- per micro-batch and per step ---------------------------------------------------------------
    def active(self) -> MicroBatch | None:
        return self._active

    @contextmanager
    def micro_batch(self, seq_ids: torch.Tensor, advantages: torch.Tensor, views: Sequence[torch.Tensor] = ()):
        """seq_ids: the sequence of every input position (shape of input_ids), −1 for padding; advantages:
        one per sequence; views: other token layouts some layers see, each as the flat input positions it
        shows (``MicroBatch.add_view``). Keep the backward of this micro-batch's loss inside the block."""
        dtype = next(self.model.parameters()).dtype
        with host_region("isopo::micro_batch"):
            mb = MicroBatch.build(
                seq_ids,
                advantages,
                n_layers=len(self.layers),
                k=self.cfg.num_samples,
                seed=self.cfg.seed,
                step=self.step,
                index=self._micro_index,
                dtype=torch.float64 if dtype == torch.float64 else torch.float32,
            )
            for positions in views:
                mb.add_view(positions)
        self._active = mb
        try:
            yield mb
        finally:
            self._active = None
            self._micro_index += 1

    def end_step(self) -> None:
        """Call once per optimizer step, after its micro-batches' backward passes."""
        with host_region("isopo::end_step"):
            if self.graphs is not None:  # the graphed visits' statistics are in the graphs' slots until now
                self.graphs.collect()
            update_emas(layer.ema for layer in self.layers)
            if self.graphs is not None:  # the new EMAs into the slots of the layers that will read them
                self.graphs.refresh()
        self.step += 1
        self._micro_index = 0


def _make_linear_forward(engine: Isopo, layer: LinearLayer):
    def forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        mb = engine._active
        if mb is None or not torch.is_grad_enabled():
            return F.linear(x, module.weight, module.bias)
        layout = mb.layout_for(x.shape[:-1])
        if layout is None:
            raise RuntimeError(
                f"ISOPO layer {layer.name}: activations of shape {tuple(x.shape)} match no token layout of the "
                f"micro-batch ({mb.layout_shapes()}); register the layer's positions with micro_batch(..., views=[...])"
            )
        device_type = "cuda" if x.is_cuda else x.device.type
        cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        params = module._parameters  # nn.Module.__getattr__ costs the host ~1 µs a lookup
        return apply_isopo_linear(x, params["weight"], params["bias"], (layer, mb, layout, device_type, cast))

    return forward
