"""``python -m bench overhead``: what one ISOPO update step costs next to one REINFORCE step.

One update step = forward + backward (+ ISOPO's gradient transform, which runs inside the backward, or the
hook baseline's transform after it) of one micro-batch of B random sequences of T tokens on a randomly
initialised preset model; with ``--optimizer`` an AdamW step is included. Prompt = the first half of each
row, response = the second half (the loss mask); no padding. Modes:

- ``reinforce``: the unmodified model under plain autograd, loss = −Σ_t A_{s(t)} log π(y_t) / n_response_tokens.
- ``isopo_ni:<setting>`` (paper, overlap, rel_overlap) and ``isopo_int``: ``algorithms.isopo.Isopo``
  installed, back-propagating the advantage-free loss −Σ_t log π(y_t) / n_response_tokens.
- ``isopo_ni_hooks`` / ``isopo_int_hooks``: ``bench.hooks_baseline.HooksIsopo`` (reference-code style: forward
  and full backward hooks, ordinary backward, then a Python loop over sequences per layer); settings paper /
  interacting with c_λ = 1.

``--lm-head all`` (the default): every mode computes the logits at every position, so all of them do the
same forward work. ``--lm-head response``: every mode runs the LM head from the first column that predicts a
response token (T/2 − 1) on, as the trainer does (``logits_to_keep``; ISOPO through a token-layout view, the
hook baseline by mapping the LM head's tokens to the last columns) — the step the trainer really takes, with
a shorter base step.

Method. All modes share one model (and one AdamW). After ``--warmup`` rounds, the ``--repeats`` timed
rounds are interleaved: each round runs every mode once (round-robin, the starting mode rotating), so
drift (thermal, a neighbour's load) hits all modes alike. Each timed step is bracketed by
``torch.cuda.synchronize`` on CUDA; the garbage collector is disabled during it (and run before the timed
rounds and before the memory steps); installing and removing ISOPO or the hooks and zeroing the gradients
are outside the timing, ISOPO's per-micro-batch bookkeeping (``Isopo.micro_batch``, ``end_step``) is inside.
Reported: median, min and max seconds, the ratio of medians to reinforce, and the median over rounds of
each round's own ratio (``paired``; robust to drift in the machine's speed during the run) with its 95 %
confidence interval (distribution-free: two order statistics of the rounds' ratios), and the median
time until the host had issued the whole step (``host_s``): on CUDA, a ``host_s`` close to the step's time
means the host's launches, not the device, set the pace. Beside the times, each mode's FLOPs counted in one
more untimed step (``gflop``, ``flop_ratio``; ``bench.flops``: the matmuls and attention that the step
issues, on the torch path, whose arithmetic the CUDA graphs and Triton kernels share). On a CPU, whose step
is paced by its matmuls, the FLOP ratio is the time ratio's floor: a target under it cannot be met by faster
code. On a GPU the reference step also waits on memory-bound work, so added matmuls can cost less than their
share of the FLOPs; there the ratio says how much arithmetic a mode adds, not how long it must take.

On CPU the heap policy (``--malloc``) defaults to ``retain``: glibc keeps freed blocks instead of unmapping
them, as PyTorch's caching allocator does on CUDA, so no mode pays page faults for temporaries it already had
last step; ``system`` measures with glibc's defaults. Either way it applies to every mode alike and is recorded.

Peak memory is measured in extra, untimed steps after the timed rounds: one per mode on CUDA, three
interleaved rounds on CPU (the median is reported):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (includes the model, its
  gradients and everything alive during the step);
- CPU: the process's peak resident set size during the step: the kernel's high-water mark (VmHWM, reset
  through /proc/self/clear_refs just before the step), so even a temporary that lives for microseconds
  counts; where that file is not writable, a background thread samples the RSS (psutil) every ~1 ms
  instead (the JSON's ``config.peak_memory`` says which). Freed heap is handed
  back to the OS (``malloc_trim``) before each mode's step so that one mode's garbage does not count against
  the next. The figure is absolute (interpreter, libraries and model included); the printed table also
  shows ``step_MiB``, the growth during the step. The measurement runs only in the memory step, never in
  the timed ones. Under ``--malloc retain`` the memory step switches glibc to mmap every block of 128 KiB or
  more (and back afterwards), so that the resident size follows live memory rather than the retained heap.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from algorithms.isopo import Isopo, IsopoConfig, kernels
from algorithms.isopo.config import STRATEGIES
from analysis.atomic import atomic_write_text

from .flops import count_flops
from .machine import PeakRss, device_name, heap_for_measuring, peak_memory_method, set_malloc_policy

MODES = (
    "reinforce",
    "isopo_ni:paper",
    "isopo_ni:overlap",
    "isopo_ni:rel_overlap",
    "isopo_int",
    "isopo_ni_hooks",
    "isopo_int_hooks",
)
SCALING_MODES = ("reinforce", "isopo_ni:paper", "isopo_int")
ENGINE_SWITCHES = {"eager": ("cuda_graphs", False), "graphs": ("cuda_graphs", True),
                   "triton": ("triton_kernels", True), "cublas": ("triton_kernels", False),
                   "instantiate": ("strategy", "instantiate"), "gram": ("strategy", "gram")}
"""An ISOPO mode's name may end in +eager, +graphs, +triton, +cublas, +instantiate or +gram (several allowed):
that mode's engine departs from the run's --cuda-graphs / --triton-kernels / --strategy, so both sides of a
switch run interleaved in one process, e.g. ``--modes isopo_int,isopo_int+triton``."""
KERNEL_SWITCHES = {"outer": ("GRAM_IMPL", "outer"), "tma": ("GRAM_IMPL", "tma"), "formgram": ("FORM_IMPL", "fused"),
                   "rownorms": ("NORMS_IMPL", "kernel"), "fused": ("OVERLAP_IMPL", "fused")}
"""+outer / +tma / +formgram / +rownorms / +fused (CUDA): the mode runs with a candidate Triton kernel
(``algorithms.isopo.kernels``'s ``GRAM_IMPL`` / ``FORM_IMPL`` / ``NORMS_IMPL`` / ``OVERLAP_IMPL``) set for its
steps, beside the default kernels in the same process."""
SCALING_T = (256, 512, 1024, 2048, 4096)
SCALING_B = (4, 8, 16, 32)
MODELS = ("tiny", "small", "qwen3-0.6b", "deep-narrow")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TINY_VOCAB = 4096
BASE = "reinforce"
MALLOC_POLICIES = ("retain", "system")
LM_HEADS = ("all", "response")
MEMORY_ROUNDS = 3
SEED = 0


class OverheadError(ValueError):
    """A bad option: ``python -m bench`` prints it as one ``error: ...`` line and exits 2."""


@dataclass
class Options:
    device: str = "cpu"
    model: str = "small"
    batch: int = 8
    seq_len: int = 1024
    dtype: str = "float32"
    autocast: str | None = None
    """``bf16`` or ``none``; None picks bf16 on CUDA and none on CPU."""
    repeats: int = 5
    warmup: int | None = None
    """None: 1, or 2 when ISOPO's tails are CUDA graphs (the first round captures, the second captures again
    for the EMA keys the first recorded)."""
    modes: list[str] | None = None
    """None: every mode (a single run) or reinforce, isopo_ni:paper and isopo_int (``--scaling``)."""
    threads: int | None = None
    num_samples: int = 250
    chunk_mib: int = 256
    """ISOPO's ``chunk_bytes`` in MiB: the largest per-sequence-gradient block held at once (the LM head's)."""
    compile: bool = False
    """ISOPO modes run each layer's computation through torch.compile (``IsopoConfig.compile``)."""
    triton_kernels: bool = IsopoConfig.triton_kernels
    """ISOPO modes run the statistics' passes over G, the weights and the weighted sum as Triton kernels on
    CUDA (``IsopoConfig.triton_kernels``, on by default; False: the torch path)."""
    cuda_graphs: bool | None = None
    """ISOPO modes replay each layer's tail as a CUDA graph (``IsopoConfig.cuda_graphs``; CUDA only). None:
    on with ``--device cuda`` unless ``--compile``, as ``IsopoConfig``'s default."""
    strategy: str = IsopoConfig.strategy
    """ISOPO's per-layer statistics route (``IsopoConfig.strategy``): auto, instantiate or gram."""
    optimizer: bool = False
    json: str | None = None
    scaling: bool = False
    scaling_t: list[int] | None = None
    scaling_b: list[int] | None = None
    lm_head: str = "all"
    """``all``: logits at every position; ``response``: from the first response-predicting column on."""
    malloc: str = "retain"
    """CPU heap policy: ``retain`` keeps freed memory in the process (as PyTorch's caching allocator does
    on CUDA), ``system`` leaves glibc's defaults (large blocks mmap'd and returned at every free)."""
    profile: str | None = None
    """Text file for one profiled step per mode (after the measurement), or None."""
    command: str = "python -m bench overhead"


# -- options ---------------------------------------------------------------------------------------------
def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OverheadError(f"{what} must be a comma-separated list of integers; got {text!r}") from None
    if not values:
        raise OverheadError(f"{what} is empty")
    return values


def check_model_and_device(model: str, device: str) -> None:
    """The preset and device options every ``python -m bench`` measurement shares."""
    if model not in MODELS:
        raise OverheadError(f"unknown model preset {model!r}; valid presets: {', '.join(MODELS)}")
    if device not in ("cpu", "cuda"):
        raise OverheadError(f"unknown device {device!r}; valid devices: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise OverheadError("--device cuda was requested but CUDA is not available (torch "
                            f"{torch.__version__}); use --device cpu")


def validate(opts: Options) -> Options:
    check_model_and_device(opts.model, opts.device)
    if opts.dtype not in DTYPES:
        raise OverheadError(f"unknown dtype {opts.dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    if opts.autocast is None:
        opts.autocast = "bf16" if opts.device == "cuda" else "none"
    if opts.autocast not in ("bf16", "none"):
        raise OverheadError(f"unknown autocast {opts.autocast!r}; valid: bf16, none")
    for name in ("batch", "repeats"):
        if getattr(opts, name) < 1:
            raise OverheadError(f"--{name} must be a positive integer; got {getattr(opts, name)}")
    if opts.seq_len < 2:
        raise OverheadError(f"--seq-len must be at least 2 (prompt and response halves); got {opts.seq_len}")
    if opts.threads is not None and opts.threads < 1:
        raise OverheadError(f"--threads must be a positive integer; got {opts.threads}")
    if opts.num_samples < 1:
        raise OverheadError(f"--num-samples must be a positive integer; got {opts.num_samples}")
    if opts.chunk_mib < 1:
        raise OverheadError(f"--chunk-mib must be a positive integer; got {opts.chunk_mib}")
    if opts.cuda_graphs and opts.device != "cuda":
        raise OverheadError("--cuda-graphs needs --device cuda")
    if opts.cuda_graphs and opts.compile:
        raise OverheadError("--cuda-graphs and --compile are alternatives; pick one")
    if opts.cuda_graphs is None:
        opts.cuda_graphs = opts.device == "cuda" and not opts.compile
    if opts.strategy not in STRATEGIES:
        raise OverheadError(f"unknown --strategy {opts.strategy!r}; valid: {', '.join(STRATEGIES)}")
    if opts.lm_head not in LM_HEADS:
        raise OverheadError(f"unknown --lm-head {opts.lm_head!r}; valid: {', '.join(LM_HEADS)}")
    if opts.malloc not in MALLOC_POLICIES:
        raise OverheadError(f"unknown --malloc {opts.malloc!r}; valid: {', '.join(MALLOC_POLICIES)}")
    if opts.modes is None:
        opts.modes = list(SCALING_MODES if opts.scaling else MODES)
    graphed = opts.cuda_graphs
    for mode in opts.modes:
        base, switches = split_mode(mode)
        if base not in MODES:
            raise OverheadError(f"unknown mode {base!r}; valid modes: {', '.join(MODES)} (ISOPO modes may add "
                                f"{', '.join('+' + s for s in ENGINE_SWITCHES)})")
        if switches and (not base.startswith("isopo_") or base.endswith("_hooks")):
            raise OverheadError(f"mode {mode!r}: the + switches apply to isopo_ni:* and isopo_int only")
        if switches.get("cuda_graphs") and (opts.device != "cuda" or opts.compile):
            raise OverheadError(f"mode {mode!r}: +graphs needs --device cuda and no --compile")
        if any(key.startswith("kernels.") for key in switches) and opts.device != "cuda":
            raise OverheadError(f"mode {mode!r}: +{' +'.join(KERNEL_SWITCHES)} choose Triton kernels, which run on "
                                f"--device cuda only")
        graphed = graphed or switches.get("cuda_graphs", opts.cuda_graphs)
    if opts.warmup is None:
        opts.warmup = 2 if graphed else 1
    if opts.warmup < 0:
        raise OverheadError(f"--warmup must be >= 0; got {opts.warmup}")
    if not opts.modes:
        raise OverheadError("--modes is empty")
    modes = list(dict.fromkeys(opts.modes))
    if BASE not in modes:
        modes.insert(0, BASE)  # every ratio is taken against it
    opts.modes = modes
    if opts.scaling:
        opts.scaling_t = list(opts.scaling_t or SCALING_T)
        opts.scaling_b = list(opts.scaling_b or SCALING_B)
        for name, values in (("--scaling-T", opts.scaling_t), ("--scaling-B", opts.scaling_b)):
            low = 2 if name == "--scaling-T" else 1
            if any(v < low for v in values):
                raise OverheadError(f"{name} values must be >= {low}; got {values}")
    elif opts.scaling_t or opts.scaling_b:
        raise OverheadError("--scaling-T / --scaling-B need --scaling")
    if opts.profile and opts.scaling:
        raise OverheadError("--profile profiles a single measurement; drop --scaling")
    return opts


# -- the update step of each mode ------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor
    seq_ids: torch.Tensor
    advantages: torch.Tensor
    targets: torch.Tensor
    """(B, T − first): the next token at each position the LM head runs on (0 at the last, which carries no
    weight)."""
    reinforce_weight: torch.Tensor
    """(B, T − first): A_{s(t)} / n_response_tokens at positions that predict a response token, else 0."""
    free_weight: torch.Tensor
    """(B, T − first): 1 / n_response_tokens at the same positions (the advantage-free loss)."""
    first: int = 0
    """The first column the LM head runs on (0 under ``--lm-head all``)."""
    views: tuple[torch.Tensor, ...] = ()
    """ISOPO's token-layout view of the LM head's columns when ``first`` > 0."""


def make_batch(batch: int, seq_len: int, vocab: int, device: str, seed: int = SEED, lm_head: str = "all") -> Batch:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + batch * 10_007 + seq_len)
    input_ids = torch.randint(3, vocab, (batch, seq_len), generator=gen)
    advantages = torch.randn(batch, generator=gen)
    prompt = seq_len // 2
    mask = torch.zeros(batch, seq_len)
    mask[:, prompt - 1 : seq_len - 1] = 1.0  # positions whose next token is a response token
    n_resp = float(mask.sum())
    targets = torch.cat([input_ids[:, 1:], torch.zeros(batch, 1, dtype=input_ids.dtype)], 1)
    seq_ids = torch.arange(batch).unsqueeze(1).expand(batch, seq_len).contiguous()
    first = prompt - 1 if lm_head == "response" else 0
    views = (torch.arange(batch * seq_len).view(batch, seq_len)[:, first:].to(device),) if first else ()
    return Batch(
        input_ids=input_ids.to(device),
        seq_ids=seq_ids.to(device),
        advantages=advantages.to(device),
        targets=targets[:, first:].to(device),
        reinforce_weight=(mask * advantages.unsqueeze(1) / n_resp)[:, first:].to(device),
        free_weight=(mask / n_resp)[:, first:].to(device),
        first=first,
        views=views,
    )


def _loss(model: nn.Module, batch: Batch, weight: torch.Tensor) -> torch.Tensor:
    keep = batch.input_ids.shape[1] - batch.first if batch.first else 0  # 0: every position
    logits = model(input_ids=batch.input_ids, use_cache=False, logits_to_keep=keep).logits
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    logp = logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return -(logp * weight).sum()


def split_mode(name: str) -> tuple[str, dict[str, object]]:
    """("isopo_int+triton+eager") → ("isopo_int", {"triton_kernels": True, "cuda_graphs": False})."""
    base, *suffixes = name.split("+")
    switches = {}
    for suffix in suffixes:
        if suffix in KERNEL_SWITCHES:
            constant, value = KERNEL_SWITCHES[suffix]
            switches[f"kernels.{constant}"] = value
            continue
        if suffix not in ENGINE_SWITCHES:
            raise OverheadError(f"mode {name!r}: unknown switch +{suffix}; valid: "
                                f"{', '.join('+' + s for s in (*ENGINE_SWITCHES, *KERNEL_SWITCHES))}")
        field, value = ENGINE_SWITCHES[suffix]
        switches[field] = value
    return base, switches


class Mode:
    """One mode's update step; ``begin``/``end`` (untimed) bracket each ``step`` (timed). A name's + switches
    override the engine's configuration (``ENGINE_SWITCHES``) or set a kernel for its steps (``KERNEL_SWITCHES``)."""

    def __init__(self, name: str, model: nn.Module, optimizer, autocast, num_samples: int,
                 chunk_bytes: int = IsopoConfig.chunk_bytes, compile: bool = False,
                 strategy: str = IsopoConfig.strategy, cuda_graphs: bool = False,
                 triton_kernels: bool = IsopoConfig.triton_kernels):
        from .hooks_baseline import HooksIsopo

        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.autocast = autocast
        self.engine = None
        self._counting_args = (model, autocast, num_samples, chunk_bytes, strategy)
        name, switches = split_mode(name)
        self.kernel_settings = {key.split(".", 1)[1]: value for key, value in switches.items()
                                if key.startswith("kernels.")}
        cuda_graphs = switches.get("cuda_graphs", cuda_graphs)
        triton_kernels = switches.get("triton_kernels", triton_kernels)
        strategy = switches.get("strategy", strategy)
        if name.startswith("isopo_ni:"):
            cfg = IsopoConfig(variant="non_interacting", setting=name.split(":", 1)[1], num_samples=num_samples,
                              chunk_bytes=chunk_bytes, compile=compile, strategy=strategy, cuda_graphs=cuda_graphs,
                              triton_kernels=triton_kernels)
            self.engine = Isopo(model, cfg)
        elif name == "isopo_int":
            self.engine = Isopo(model, IsopoConfig(variant="interacting", setting=None, c_lambda=1.0,
                                                   num_samples=num_samples, chunk_bytes=chunk_bytes,
                                                   compile=compile, strategy=strategy, cuda_graphs=cuda_graphs,
                                                   triton_kernels=triton_kernels))
        elif name == "isopo_ni_hooks":
            self.engine = HooksIsopo(model, IsopoConfig(setting="paper", num_samples=num_samples))
        elif name == "isopo_int_hooks":
            self.engine = HooksIsopo(model, IsopoConfig(variant="interacting", setting=None, c_lambda=1.0,
                                                        num_samples=num_samples))

    def counting_twin(self) -> Mode:
        """This mode on the torch path (eager layers, torch operations, no compile, no optimizer): the same
        arithmetic with every operation visible to the FLOP counter (``bench.flops``), which does not see
        a replayed CUDA graph or a Triton kernel. Only the statistics route (+instantiate, +gram) carries
        over from the name's switches; the others choose how the same FLOPs run."""
        base, *suffixes = self.name.split("+")
        route = [s for s in suffixes if ENGINE_SWITCHES.get(s, ("",))[0] == "strategy"]
        model, autocast, num_samples, chunk_bytes, strategy = self._counting_args
        return Mode("+".join([base, *route]), model, None, autocast, num_samples, chunk_bytes, compile=False,
                    strategy=strategy, cuda_graphs=False, triton_kernels=False)

    def begin(self) -> None:
        self.model.zero_grad(set_to_none=True)
        if self.engine is not None:
            self.engine.install()

    def end(self) -> None:
        if self.engine is not None:
            self.engine.remove()

    def step(self, batch: Batch) -> None:
        with kernels.settings(**self.kernel_settings):
            self._step(batch)

    def _step(self, batch: Batch) -> None:
        if self.engine is None:
            with self.autocast():
                loss = _loss(self.model, batch, batch.reinforce_weight)
            loss.backward()
        else:
            # The hook baseline finds the LM head's columns from its activations' shape instead.
            views = {"views": batch.views} if batch.views and isinstance(self.engine, Isopo) else {}
            with self.engine.micro_batch(batch.seq_ids, batch.advantages, **views):
                with self.autocast():
                    loss = _loss(self.model, batch, batch.free_weight)
                loss.backward()
            self.engine.end_step()
        if self.optimizer is not None:
            self.optimizer.step()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(mode: Mode, batch: Batch, device: str) -> tuple[float, float]:
    """(seconds to the step's end on the device, seconds until the host had issued the whole step)."""
    mode.begin()
    gc.disable()  # no collector pause inside the timing (a full collection costs ~0.3 s with transformers loaded)
    try:
        _sync(device)
        start = time.perf_counter()
        mode.step(batch)
        issued = time.perf_counter() - start
        _sync(device)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
        mode.end()
    return elapsed, issued


def _memory(mode: Mode, batch: Batch, device: str) -> tuple[float, float]:
    """(peak MiB, growth during the step in MiB) of one untimed step."""
    mode.begin()
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            mode.step(batch)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            with heap_for_measuring(), PeakRss() as sampler:
                mode.step(batch)
            start, peak = sampler.start_rss, sampler.peak
    finally:
        mode.end()
    return peak / 2**20, (peak - start) / 2**20


def measure(modes: list[Mode], batch: Batch, device: str, repeats: int, warmup: int,
            progress=None, failed: dict[str, str] | None = None) -> dict[str, dict]:
    """Warm-up, interleaved timed rounds, then one memory step per mode; the per-mode result dicts. A mode
    other than reinforce whose warm-up step fails (a kernel that does not build on this device, say) is left
    out with a warning, its error put in ``failed``, and the others are measured."""
    modes = list(modes)
    for _ in range(warmup):
        for mode in list(modes):
            try:
                _timed(mode, batch, device)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - one mode's failure: report it, measure the rest
                if mode.name == BASE:
                    raise
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                _log(f"overhead: mode {mode.name} failed in its warm-up ({error}); measuring the others")
                modes.remove(mode)
                if failed is not None:
                    failed[mode.name] = error
    gc.collect()
    times: dict[str, list[float]] = {m.name: [] for m in modes}
    host: dict[str, list[float]] = {m.name: [] for m in modes}
    for rep in range(repeats):
        shift = rep % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            elapsed, issued = _timed(mode, batch, device)
            times[mode.name].append(elapsed)
            host[mode.name].append(issued)
        if progress:
            progress(f"round {rep + 1}/{repeats}")
    # The resident peak of one CPU step scatters by a few per cent (heap fragmentation of small blocks), so
    # the memory steps are interleaved rounds too and each mode reports its median.
    peaks: dict[str, list[tuple[float, float]]] = {m.name: [] for m in modes}
    for _ in range(MEMORY_ROUNDS if device == "cpu" else 1):
        for mode in modes:
            gc.collect()
            peaks[mode.name].append(_memory(mode, batch, device))
    memory = {name: sorted(values)[len(values) // 2] for name, values in peaks.items()}
    flops = {mode.name: _counted_flops(mode, batch, device) for mode in modes}
    base_t = statistics.median(times[BASE])
    base_m = memory[BASE][0]
    results = {}
    for mode in modes:
        med = statistics.median(times[mode.name])
        # Each round's own ratio: the round-robin puts both steps seconds apart, so slow drift in the
        # machine's speed (a neighbour's memory traffic) cancels, which the ratio of medians does not do.
        paired = [t / b for t, b in zip(times[mode.name], times[BASE])]
        results[mode.name] = {
            "median_s": med,
            "min_s": min(times[mode.name]),
            "max_s": max(times[mode.name]),
            "ratio_vs_reinforce": med / base_t,
            "paired_ratio_median": statistics.median(paired),
            "paired_ratio_ci95": _median_ci(paired),
            "host_median_s": statistics.median(host[mode.name]),
            "peak_mib": memory[mode.name][0],
            "peak_ratio_vs_reinforce": memory[mode.name][0] / base_m,
            "gflop": None if flops[mode.name] is None else flops[mode.name] / 1e9,
            "flop_ratio_vs_reinforce": None if None in (flops[mode.name], flops[BASE])
            else flops[mode.name] / flops[BASE],
            "_step_mib": memory[mode.name][1],
        }
    return results


def _counted_flops(mode: Mode, batch: Batch, device: str) -> int | None:
    """The FLOPs of one untimed step of ``mode``'s counting twin (``bench.flops``). None, with a warning,
    where that step fails (the eager twin of a mode that only fit the device with its CUDA graphs, say): the
    timings stand without it."""
    twin = mode.counting_twin()
    twin.begin()
    try:
        return count_flops(lambda: twin.step(batch))
    except Exception as e:  # noqa: BLE001 - the count is an addition to the measurement, not part of it
        _log(f"overhead: could not count the FLOPs of mode {mode.name} ({type(e).__name__}); reported as none")
        return None
    finally:
        _free_device_memory([twin], device)


def _median_ci(values: list[float]) -> list[float] | None:
    """The paired ratio's 95 % confidence interval (distribution-free, ``analysis.stats.median_ci``): what a
    target such as "≤ 1.05×" should be read against on a noisy machine. None below 6 rounds."""
    from analysis.stats import median_ci

    lo, hi = median_ci(values)
    return None if math.isnan(lo) else [lo, hi]


def profile_steps(modes: list[Mode], batch: Batch, device: str, path: Path, rows: int = 25) -> None:
    """One untimed, profiled step per mode; each mode's busiest operators (host time, and device time on
    CUDA), then its busiest (operator, input shapes) pairs by host time, then (CUDA) the GPU's idle time by
    cause, into one text file, with the step's total host and device time on the heading line; at the end
    (CUDA) each mode's device time against REINFORCE's, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    from . import gaps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sections = []
    kernel_totals: dict[str, dict[str, tuple[int, int]]] = {}
    for mode in modes:
        mode.begin()
        try:
            with profile(activities=activities, record_shapes=True) as prof:
                mode.step(batch)
                _sync(device)
        finally:
            mode.end()
        events = prof.key_averages()
        host_ms = sum(e.self_cpu_time_total for e in events) / 1e3
        device_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
        # What a GPU step's host cost scales with: operators dispatched, kernels launched.
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx"))
        parts = [f"== {mode.name}: host {host_ms:.1f} ms, device {device_ms:.1f} ms (self times summed), "
                 f"{ops} aten operator calls, {launches} kernel launches",
                 events.table(sort_by="self_cpu_time_total", row_limit=rows)]
        if device == "cuda":
            parts.append(events.table(sort_by="self_device_time_total", row_limit=rows))
        # The same operator at different shapes can cost the host very differently (a layer's own matmul
        # against the LM head's chunks): the busiest (operator, input shapes) pairs.
        parts.append("by input shapes, host time:")
        parts.append(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                        row_limit=rows, max_shapes_column_width=60))
        # Where the GPU waited for the host, and for which launch (bench/gaps.py).
        host_ops, spans = gaps.from_profile(prof)
        parts.append(gaps.format_report(gaps.analyse(host_ops, spans)))
        kernel_totals[mode.name] = gaps.device_time_by_kernel(spans)
        sections.append("\n".join(parts))
    # Each mode's extra device time over REINFORCE's, kernel by kernel, with names long enough to tell the
    # elementwise kernels apart.
    base = "reinforce"
    if device == "cuda" and base in kernel_totals:
        sections += [gaps.format_kernel_difference(name, totals, base, kernel_totals[base], rows)
                     for name, totals in kernel_totals.items() if name != base]
    atomic_write_text(path, "\n\n".join(sections) + "\n")


def public(results: dict[str, dict]) -> dict[str, dict]:
    """The results as written to JSON (without the table-only fields)."""
    return {m: {k: v for k, v in r.items() if not k.startswith("_")} for m, r in results.items()}


# -- setup, output ---------------------------------------------------------------------------------------
def build(opts: Options, max_seq_len: int) -> tuple[nn.Module, int]:
    from .models import build_model, preset_config

    config = preset_config(opts.model, vocab_size=TINY_VOCAB if opts.model == "tiny" else None)
    config.max_position_embeddings = max(config.max_position_embeddings, max_seq_len)
    model = build_model(config, seed=SEED, dtype=DTYPES[opts.dtype]).to(opts.device)
    model.train()
    return model, config.vocab_size


def make_modes(opts: Options, model: nn.Module) -> list[Mode]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01) if opts.optimizer else None
    if opts.autocast == "bf16":
        def autocast():
            return torch.autocast(opts.device, dtype=torch.bfloat16)
    else:
        autocast = nullcontext
    chunk_bytes = opts.chunk_mib * 2**20
    return [Mode(name, model, optimizer, autocast, opts.num_samples, chunk_bytes, opts.compile, opts.strategy,
                 opts.cuda_graphs, opts.triton_kernels) for name in opts.modes]


def config_dict(opts: Options) -> dict:
    return {
        "model": opts.model,
        "batch": opts.batch,
        "seq_len": opts.seq_len,
        "dtype": opts.dtype,
        "autocast": opts.autocast,
        "threads": torch.get_num_threads(),
        "malloc": opts.malloc if opts.device == "cpu" else None,
        "lm_head": opts.lm_head,
        "peak_memory": peak_memory_method(opts.device),
        "repeats": opts.repeats,
        "warmup": opts.warmup,
        "num_samples": opts.num_samples,
        "chunk_mib": opts.chunk_mib,
        "compile": opts.compile,
        "strategy": opts.strategy,
        "cuda_graphs": opts.cuda_graphs,
        "triton_kernels": opts.triton_kernels,
        "optimizer": "adamw" if opts.optimizer else None,
        "torch_version": torch.__version__,
    }


def write_json(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def format_table(results: dict[str, dict]) -> str:
    header = ("mode", "median_s", "min_s", "max_s", "host_s", "ratio", "paired", "paired_95%CI", "flop_ratio",
              "peak_MiB", "peak_ratio", "step_MiB")
    rows = [header]
    for mode, r in results.items():
        rows.append((mode, f"{r['median_s']:.4f}", f"{r['min_s']:.4f}", f"{r['max_s']:.4f}",
                     f"{r['host_median_s']:.4f}", f"{r['ratio_vs_reinforce']:.3f}", f"{r['paired_ratio_median']:.3f}",
                     _format_ci(r.get("paired_ratio_ci95")), _format_ratio(r["flop_ratio_vs_reinforce"]),
                     f"{r['peak_mib']:.1f}", f"{r['peak_ratio_vs_reinforce']:.3f}",
                     f"{r.get('_step_mib', float('nan')):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    )


def _format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}"


def _format_ci(ci: list[float] | None) -> str:
    return "-" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"


def format_scaling(modes: list[str], key: str, fixed: str, values: list[tuple[int, dict | None]]) -> str:
    """One sweep: a row per value, reinforce's median seconds, then each mode's time ratio (memory ratio,
    FLOP ratio)."""
    header = (key, f"{BASE}_s") + tuple(m for m in modes if m != BASE)
    rows = [header]
    for v, res in values:
        if res is None:
            continue
        cells = [str(v), f"{res[BASE]['median_s']:.4f}"]
        for m in modes:
            if m != BASE:
                cells.append(f"{res[m]['ratio_vs_reinforce']:.3f}x (mem {res[m]['peak_ratio_vs_reinforce']:.2f}, "
                             f"flops {_format_ratio(res[m]['flop_ratio_vs_reinforce'])})" if m in res else "failed")
        rows.append(tuple(cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [fixed]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _heap_note(opts: Options) -> str:
    heap = f", heap {opts.malloc}" if opts.device == "cpu" else ""
    return f"{heap}, LM head on {'every position' if opts.lm_head == 'all' else 'the response columns'}"


def _lm_head_suffix(opts: Options) -> str:
    """Default file names keep the two LM-head settings apart."""
    return "" if opts.lm_head == "all" else f"-lmhead-{opts.lm_head}"


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


# -- entry points ----------------------------------------------------------------------------------------
def run(opts: Options) -> int:
    opts = validate(opts)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if opts.device == "cpu" and not set_malloc_policy(opts.malloc):
        _log(f"overhead: could not set the heap policy {opts.malloc!r} (not glibc?); measuring with the system's")
        opts.malloc = "system"
    return run_scaling(opts) if opts.scaling else run_single(opts)


def run_single(opts: Options) -> int:
    path = Path(opts.json or f"results/overhead/{opts.model}-{opts.device}-B{opts.batch}-T{opts.seq_len}"
                f"{_lm_head_suffix(opts)}.json")
    model, vocab = build(opts, opts.seq_len)
    modes = make_modes(opts, model)
    batch = make_batch(opts.batch, opts.seq_len, vocab, opts.device, lm_head=opts.lm_head)
    _log(f"overhead: {opts.model} on {opts.device}, B={opts.batch} T={opts.seq_len}, "
         f"{len(modes)} modes, {opts.warmup} warm-up + {opts.repeats} timed rounds")
    start = time.perf_counter()
    failed: dict[str, str] = {}
    results = measure(modes, batch, opts.device, opts.repeats, opts.warmup, progress=_log, failed=failed)
    doc = {"device": device_name(opts.device), "date": _now(), "command": opts.command,
           "config": config_dict(opts), "results": public(results)}
    if failed:
        doc["failed_modes"] = failed
    write_json(path, doc)
    print(f"{doc['device']}, {opts.model}, B={opts.batch}, T={opts.seq_len}, dtype {opts.dtype}, autocast "
          f"{opts.autocast}, {doc['config']['threads']} thread(s), optimizer {doc['config']['optimizer']}, "
          f"K={opts.num_samples}, median of {opts.repeats}{_heap_note(opts)}")
    print(format_table(results))
    print(f"wall {time.perf_counter() - start:.1f} s; wrote {path}")
    if opts.profile:
        profile_steps([m for m in modes if m.name not in failed], batch, opts.device, Path(opts.profile))
        print(f"wrote the profile of one step per mode to {opts.profile}")
    return 0


def _free_device_memory(modes: list[Mode], device: str) -> None:
    for mode in modes:
        mode.end()
        mode.model.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_scaling(opts: Options) -> int:
    path = Path(opts.json or f"results/overhead/scaling-{opts.model}-{opts.device}{_lm_head_suffix(opts)}.json")
    grid = [(opts.batch, t) for t in opts.scaling_t] + [(b, opts.seq_len) for b in opts.scaling_b]
    grid = list(dict.fromkeys(grid))
    model, vocab = build(opts, max(t for _, t in grid))
    modes = make_modes(opts, model)
    config = {**config_dict(opts), "scaling_T": opts.scaling_t, "scaling_B": opts.scaling_b,
              "modes": opts.modes}
    doc = {"device": device_name(opts.device), "date": _now(), "command": opts.command, "config": config,
           "points": []}
    measured: dict[tuple[int, int], dict] = {}
    start = time.perf_counter()
    for b, t in grid:
        _log(f"scaling: B={b} T={t} ({len(measured) + 1}/{len(grid)})")
        batch = make_batch(b, t, vocab, opts.device, lm_head=opts.lm_head)
        failed: dict[str, str] = {}
        try:
            measured[(b, t)] = measure(modes, batch, opts.device, opts.repeats, opts.warmup, failed=failed)
        except torch.OutOfMemoryError:
            # A point too large for the device ends this point, not the sweep.
            del batch
            _free_device_memory(modes, opts.device)
            _log(f"scaling: B={b} T={t} ran out of {opts.device} memory; recorded under failed_points")
            doc.setdefault("failed_points", []).append({"batch": b, "seq_len": t, "error": "out of memory"})
            write_json(path, doc)
            continue
        del batch
        doc["points"].append({"batch": b, "seq_len": t, "results": public(measured[(b, t)]),
                              **({"failed_modes": failed} if failed else {})})
        # A scaling file also reads as a single-point overhead file (analysis.load_overhead wants "results"):
        # the point at the given B and T if the sweep has it, else the first point.
        base = (opts.batch, opts.seq_len) if (opts.batch, opts.seq_len) in measured else grid[0]
        if base in measured:
            doc["results"] = public(measured[base])
            doc["results_point"] = {"batch": base[0], "seq_len": base[1]}
        write_json(path, doc)  # after every point, so a long sweep keeps what it has
    print(f"{doc['device']}, {opts.model}, dtype {opts.dtype}, autocast {opts.autocast}, "
          f"{config['threads']} thread(s), optimizer {config['optimizer']}, K={opts.num_samples}, "
          f"median of {opts.repeats}{_heap_note(opts)}; ratio of median step time to {BASE} (peak-memory ratio, "
          f"FLOP ratio)")
    print(format_scaling(opts.modes, "T", f"T sweep at B={opts.batch}",
                         [(t, measured.get((opts.batch, t))) for t in opts.scaling_t]))
    print(format_scaling(opts.modes, "B", f"B sweep at T={opts.seq_len}",
                         [(b, measured.get((b, opts.seq_len))) for b in opts.scaling_b]))
    print(f"wall {time.perf_counter() - start:.1f} s; wrote {path}")
    return 0
