"""The one rollout harness every algorithm shares: batched sampling, and the log-probs training needs.

Sampling noise is a pure function of (seed, step, prompt key, sample index, position, vocabulary index),
computed with a counter-based hash and applied by Gumbel-max. Two consequences the benchmark relies on:
two algorithms holding the same weights draw exactly the same rollouts, and a prompt's samples do not depend
on which other prompts share its batch or on their order (up to floating-point ties in the logits).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

# Re-compact the batch (drop finished rows from the KV cache) once this fraction of the rows still computed
# have finished: copying the cache costs about one decode step, so it pays off only for a sizeable drop.
_COMPACT_FRACTION = 0.25
# First guess at the nucleus size, grown 4x until every row's nucleus fits: a sharp distribution over a large
# vocabulary then costs a small top-k instead of a full sort.
_NUCLEUS_FIRST_K = 64


@dataclass(frozen=True)
class SamplingConfig:
    """How ``generate`` samples."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax, first index on ties)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]: sample among the most likely tokens whose mass first reaches ``top_p`` (tokens
    tied with the last one kept are kept too, so the nucleus is a function of the logits alone)."""
    max_new_tokens: int = 32
    """Most tokens generated per row, EOS included."""
    n: int = 1
    """Samples per prompt (the group size of group-relative methods)."""

    def __post_init__(self):
        if not (self.temperature >= 0 and self.temperature != float("inf")):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {self.n}")


@dataclass
class Rollout:
    """What ``generate`` returns: R = prompts x n rows, prompt-major (all of prompt 0's samples first)."""

    prompt_ids: torch.Tensor
    """(R, P) int64, left-padded with pad_id."""
    prompt_mask: torch.Tensor
    """(R, P) int64, 1 on prompt tokens."""
    response_ids: torch.Tensor
    """(R, L) int64, right-padded with pad_id after EOS; L is the longest response, <= max_new_tokens."""
    response_mask: torch.Tensor
    """(R, L) int64, 1 on generated tokens up to and including EOS."""
    sample_log_probs: torch.Tensor
    """(R, L) log-prob of each sampled token under log_softmax(logits / temperature) (temperature 0 read
    as 1), 0 on padding. With top_p < 1 this is the unfiltered tempered distribution, as other RL trainers
    record, so it matches ``token_log_probs`` at the same temperature exactly."""
    group_ids: torch.Tensor
    """(R,) int64, index of the row's prompt in the ``generate`` call."""
    keys: torch.Tensor
    """(R,) int64, the caller's key of the row's prompt (what the sampling noise is keyed on)."""
    sample_index: torch.Tensor
    """(R,) int64, which of the prompt's n samples the row is."""
    response_lengths: torch.Tensor
    """(R,) int64, generated tokens per row (EOS included)."""


@dataclass
class TrainBatch:
    """Rollout rows as single right-padded sequences [prompt, response], ready for a training forward pass."""

    input_ids: torch.Tensor
    """(R, S) int64, prompt then response, pad_id after."""
    attention_mask: torch.Tensor
    """(R, S) int64, 1 on real tokens."""
    position_ids: torch.Tensor
    """(R, S) int64, 0..S-1 on every row (the sequences start at column 0)."""
    response_mask: torch.Tensor
    """(R, S) int64, 1 at positions whose NEXT token is a response token, i.e. whose logits predict it."""
    targets: torch.Tensor
    """(R, S) int64, input_ids shifted left by one, pad_id in the last column."""
    old_log_probs: torch.Tensor
    """(R, S) the sampling log-probs of the targets at response positions, 0 elsewhere."""
    seq_ids: torch.Tensor
    """(R, S) int64, the row index where attention_mask is 1, else -1."""
    group_ids: torch.Tensor
    """(R,) int64, index of the row's prompt in the ``generate`` call."""


# ---------------------------------------------------------------- counter-based noise (splitmix64 in int64)


def _s64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MUL1 = _s64(0xBF58476D1CE4E5B9)
_MUL2 = _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the sign-extended bits makes it logical
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, a bijection on 64-bit words (int64 multiplication wraps like uint64)."""
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def _child(h: torch.Tensor, counter: torch.Tensor | int) -> torch.Tensor:
    """Output ``counter`` of the splitmix64 stream whose state is ``h``: a new, well-mixed key."""
    if isinstance(counter, int):  # Python ints do not wrap: reduce to 64 bits before torch sees them
        return _mix(h + _s64(((counter + 1) * _GOLDEN) % (1 << 64)))
    return _mix(h + (counter + 1) * _GOLDEN)


def row_keys(seed: int, step: int, keys: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """(R,) int64 hash of (seed, step, prompt key, sample index): the root of one row's sampling noise."""
    h = _mix(torch.full_like(keys, _s64(seed % (1 << 64))))
    return _child(_child(_child(h, step), keys), sample_index)


def gumbel_noise(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Standard Gumbel noise from hashed words ``h`` (already mixed), in float64 or float32.

    The uniform is (k + 0.5) / 2^b for the top b bits (53 or 24), exact in the target dtype and strictly
    inside (0, 1), so the double log is always finite.
    """
    bits = 53 if dtype == torch.float64 else 24
    u = (_shr(h, 64 - bits).to(dtype) + 0.5) * 2.0**-bits
    return -torch.log(-torch.log(u))


# ---------------------------------------------------------------- sampling


def _nucleus(logp: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate (log-probs, vocabulary ids), (R, K), with -inf outside each row's top-p nucleus."""
    vocab = logp.shape[-1]
    k = min(vocab, _NUCLEUS_FIRST_K)
    while True:
        vals, idx = logp.topk(k, dim=-1)
        probs = vals.exp()
        n_in = ((probs.cumsum(-1) - probs) < top_p).sum(-1, keepdim=True).clamp(min=1)
        inside = vals >= vals.gather(1, n_in - 1)
        if k == vocab or not inside[:, -1].any():
            return vals.masked_fill(~inside, float("-inf")), idx
        k = min(vocab, 4 * k)


def _sample(
    logits: torch.Tensor, noise_keys: torch.Tensor, cfg: SamplingConfig, vocab_counter: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (R,), their log-probs (R,)) at one position; ``noise_keys`` (R,) already include it."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # half-precision logits are too coarse for the softmax and the noise
    if cfg.temperature == 0:
        tokens = logits.argmax(-1)
        logp = logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(-1)
        return tokens, logp
    scaled = logits / cfg.temperature
    logp_all = scaled - scaled.logsumexp(-1, keepdim=True)
    if cfg.top_p < 1:
        cand_logp, cand_ids = _nucleus(logp_all, cfg.top_p)
        noise = gumbel_noise(_child(noise_keys[:, None], cand_ids), logits.dtype)
        tokens = cand_ids.gather(1, (cand_logp + noise).argmax(-1, keepdim=True))[:, 0]
    else:
        noise = gumbel_noise(_child(noise_keys[:, None], vocab_counter[None, :]), logits.dtype)
        tokens = (logp_all + noise).argmax(-1)
    return tokens, logp_all.gather(1, tokens[:, None])[:, 0]


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] >= width - lengths[:, None]
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    ids[mask] = torch.tensor([tok for p in prompts for tok in p], dtype=torch.long)  # fills row-major
    return ids, mask.long()


def _check_inputs(prompts: list[list[int]], keys: list[int]) -> None:
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if len(keys) != len(prompts):
        raise ValueError(f"got {len(keys)} keys for {len(prompts)} prompts; give one key per prompt")
    if len(set(keys)) != len(keys):
        raise ValueError("prompt keys must be distinct: equal keys would draw identical samples")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts must be non-empty; empty at indices {empty[:10]}")


def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    keys: list[int],
    seed: int,
    step: int,
    cfg: SamplingConfig,
    pad_id: int,
    eos_id: int,
) -> Rollout:
    """Sample ``cfg.n`` responses per prompt from a Hugging Face causal LM, batched, with a KV cache.

    ``keys`` identify prompts stably (e.g. the dataset index) and, with ``seed``, ``step``, the sample index
    and the position, fully determine the sampling noise. The model is run in eval mode without gradients and
    its training flag is restored afterwards.
    """
    _check_inputs(prompts, keys)
    n, max_new = cfg.n, cfg.max_new_tokens
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # not inference_mode: the outputs feed autograd graphs in the trainer
            return _generate(model, prompts, keys, seed, step, cfg, pad_id, eos_id, n, max_new)
    finally:
        model.train(was_training)


def _generate(model, prompts, keys, seed, step, cfg, pad_id, eos_id, n, max_new) -> Rollout:
    device = next(model.parameters()).device
    base_ids, base_mask = _left_pad(prompts, pad_id)
    base_ids, base_mask = base_ids.to(device), base_mask.to(device)
    rows = len(prompts) * n
    width = base_ids.shape[1]

    # Prefill each prompt once, then copy its cache to its n sample rows.
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=base_ids,
        attention_mask=base_mask,
        position_ids=(base_mask.cumsum(-1) - 1).clamp(min=0),
        past_key_values=cache,
        use_cache=True,
        **({"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}),
    )
    logits = out.logits[:, -1].repeat_interleave(n, dim=0)
    if n > 1:
        cache.batch_repeat_interleave(n)

    group_ids = torch.arange(len(prompts), device=device).repeat_interleave(n)
    sample_index = torch.arange(n, device=device).repeat(len(prompts))
    key_t = torch.tensor(keys, dtype=torch.long, device=device)[group_ids]
    noise_root = row_keys(seed, step, key_t, sample_index)
    vocab_counter = torch.arange(logits.shape[-1], device=device)

    # Per-row state, indexed by `active` (the original row ids still in the KV cache).
    prompt_ids, prompt_mask = base_ids[group_ids], base_mask[group_ids]
    attn = torch.cat([prompt_mask, prompt_mask.new_ones(rows, max_new)], dim=1)
    next_pos = prompt_mask.sum(-1)
    active = torch.arange(rows, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)

    response_ids = torch.full((rows, max_new), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((rows, max_new), dtype=torch.long, device=device)
    lp_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    sample_lp = torch.zeros((rows, max_new), dtype=lp_dtype, device=device)
    steps = 0
    for t in range(max_new):
        tokens, logp = _sample(logits, _child(noise_root, t), cfg, vocab_counter)
        live = ~done
        rows_live = active[live]
        response_ids[rows_live, t] = tokens[live]
        response_mask[rows_live, t] = 1
        sample_lp[rows_live, t] = logp[live].to(sample_lp.dtype)
        done = done | (tokens == eos_id)
        steps = t + 1
        if t == max_new - 1 or bool(done.all()):
            break
        if int(done.sum()) >= _COMPACT_FRACTION * len(active):
            keep = (~done).nonzero()[:, 0]
            cache.batch_select_indices(keep)
            active, done, tokens = active[keep], done[keep], tokens[keep]
            attn, next_pos, noise_root = attn[keep], next_pos[keep], noise_root[keep]
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=attn[:, : width + t + 1],
            position_ids=(next_pos + t)[:, None],
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]

    response_ids, response_mask, sample_lp = (
        response_ids[:, :steps],
        response_mask[:, :steps],
        sample_lp[:, :steps],
    )
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        sample_log_probs=sample_lp,
        group_ids=group_ids,
        keys=key_t,
        sample_index=sample_index,
        response_lengths=response_mask.sum(-1),
    )


# ---------------------------------------------------------------- training view


def to_train_batch(rollout: Rollout, pad_id: int) -> TrainBatch:
    """Re-lay each row as one sequence starting at column 0: [prompt tokens, response tokens, pad...]."""
    prompt_len = rollout.prompt_mask.sum(-1)
    resp_len = rollout.response_mask.sum(-1)
    seq_len = prompt_len + resp_len
    rows, width = rollout.prompt_ids.shape
    device = rollout.prompt_ids.device
    total = int(seq_len.max())

    joined = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    cols = torch.arange(total, device=device)[None, :]
    # Column j of a row is column j + (its left padding) of the joined [prompt, response] row.
    src = (cols + (width - prompt_len)[:, None]).clamp(max=joined.shape[1] - 1)
    real = cols < seq_len[:, None]
    input_ids = joined.gather(1, src).masked_fill(~real, pad_id)
    targets = F.pad(input_ids[:, 1:], (0, 1), value=pad_id)
    # Position j predicts token j + 1, a response token when prompt_len <= j + 1 < seq_len.
    response_mask = (cols >= (prompt_len - 1)[:, None]) & (cols < (seq_len - 1)[:, None])
    resp_col = (cols - (prompt_len - 1)[:, None]).clamp(0, max(rollout.response_ids.shape[1] - 1, 0))
    old_lp = torch.where(response_mask, rollout.sample_log_probs.gather(1, resp_col), 0.0)
    row_idx = torch.arange(rows, device=device)[:, None].expand(rows, total)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=real.long(),
        position_ids=cols.expand(rows, total).clone(),
        response_mask=response_mask.long(),
        targets=targets,
        old_log_probs=old_lp,
        seq_ids=torch.where(real, row_idx, -1),
        group_ids=rollout.group_ids,
    )


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def logits_start(batch: TrainBatch) -> int:
    """The first column any row's response is predicted from: the LM head runs from there on only."""
    return int(batch.response_mask.any(0).long().argmax()) if bool(batch.response_mask.any()) else 0


def token_log_probs(
    model: torch.nn.Module,
    batch: TrainBatch,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (R, S) of ``batch.targets`` under log_softmax(logits / temperature), and optionally the
    entropy (R, S) of that distribution. Runs with autograd as the caller has it (the trainer backprops).

    Temperature 0 is read as 1, as in ``generate``. Values are meaningful where ``response_mask`` is 1.
    Columns before the batch's first response position hold 0: logits are kept only from there on, which
    skips the LM head (and its (R, S, V) output) over the prompts.
    """
    temp = 1.0 if temperature == 0 else float(temperature)
    first = logits_start(batch)
    kwargs = {"logits_to_keep": batch.input_ids.shape[1] - first} if _accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **kwargs,
    ).logits
    logits = logits[:, -(batch.input_ids.shape[1] - first) :]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if temp != 1.0:
        logits = logits / temp
    lse = logits.logsumexp(-1)
    targets = batch.targets[:, first:]
    log_probs = logits.gather(-1, targets[..., None])[..., 0] - lse
    entropy = None
    if with_entropy:
        # H = lse - E_p[z] for the tempered logits z; costs one extra (R, S, V) tensor.
        entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)
        entropy = F.pad(entropy, (first, 0))
    return F.pad(log_probs, (first, 0)), entropy
