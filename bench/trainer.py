"""One loop for every algorithm:

    prompts → rollouts → rewards → advantages → the algorithm's updates (mini-batches × epochs, micro-batch
    accumulation, optional ISOPO transform, AdamW, gradient clipping) → metrics; greedy validation every k steps.

A run is a pure function of (run config, algorithm, seed): same inputs, same numbers on CPU.
"""

from __future__ import annotations

import copy
import math
import random
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from algorithms import ADV_ESTIMATORS, POLICY_LOSSES, AlgorithmConfig, get_algorithm
from algorithms.isopo import Isopo
from algorithms.losses import agg_loss, kl_penalty, value_loss
from tasks import Task, get_task

from .config import ConfigError, RunConfig
from .policy import initial_policy, load_policy_tokenizer
from .rollout import SamplingConfig, TrainBatch, generate, logits_start, to_train_batch, token_log_probs

METRIC_COLUMNS = [
    "val_acc", "reward_mean", "reward_std", "kl", "entropy", "grad_norm", "clip_frac", "response_len", "loss",
    "time_rollout_s", "time_update_s", "time_other_s", "peak_mem_mib",
]


@dataclass
class RunResult:
    rows: list[dict] = field(default_factory=list)
    """One dict per step (step 0 = before training) with METRIC_COLUMNS."""
    status: str = "finished"
    """finished | diverged."""
    diverged_step: int | None = None
    wall_s: float = 0.0


class Diverged(Exception):
    pass


def resolve_algorithm(name: str, run: RunConfig, per_algorithm: dict | None = None) -> AlgorithmConfig:
    overrides = {**run.algorithm, **(per_algorithm or {})}
    if "isopo" in overrides and isinstance(overrides["isopo"], dict):
        base = get_algorithm(name).isopo
        overrides["isopo"] = base.replace(**overrides["isopo"])
    return get_algorithm(name, **overrides)


class Critic(nn.Module):
    """A value head on its own copy of the policy's backbone (initialised from the policy's weights)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(policy.base_model)
        self.head = nn.Linear(policy.config.hidden_size, 1, dtype=next(policy.parameters()).dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


def select_rows(batch: TrainBatch, rows: torch.Tensor) -> TrainBatch:
    """The given rows, cut to their longest sequence and with sequence ids renumbered 0..b-1."""
    width = int(batch.attention_mask[rows].sum(1).max())
    pick = lambda t: t[rows, :width]  # noqa: E731
    attn = pick(batch.attention_mask)
    local = torch.arange(len(rows), device=attn.device).unsqueeze(1)
    return TrainBatch(
        input_ids=pick(batch.input_ids), attention_mask=attn, position_ids=pick(batch.position_ids),
        response_mask=pick(batch.response_mask), targets=pick(batch.targets),
        old_log_probs=pick(batch.old_log_probs), seq_ids=torch.where(attn.bool(), local, -1),
        group_ids=batch.group_ids[rows],
    )


def peak_memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class Trainer:
    def __init__(self, run: RunConfig, algorithm: AlgorithmConfig, seed: int, cache_dir: Path):
        self.run, self.algo, self.seed = run, algorithm, seed
        if run.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("run.device=cuda but no CUDA device is available")
        torch.set_num_threads(run.threads)
        torch.manual_seed(seed)
        self.task: Task = get_task(run.task, **run.task_options)
        self.tokenizer = load_policy_tokenizer(run.model, self.task)
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.model = initial_policy(run.model, self.task, self.tokenizer, cache_dir, run.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=run.lr, weight_decay=run.weight_decay)
        self.critic = self.critic_opt = self.reference = self.isopo = None
        if algorithm.needs_critic:
            self.critic = Critic(self.model).to(run.device)
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=algorithm.critic_lr,
                                                weight_decay=run.weight_decay)
        if algorithm.needs_reference:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        if algorithm.grad_transform == "isopo":
            self.isopo = Isopo(self.model, algorithm.isopo.replace(seed=algorithm.isopo.seed + seed))
        n_rows = run.prompts_per_step * run.samples_per_prompt
        if n_rows % algorithm.mini_batches:
            raise ConfigError(
                f"{n_rows} sequences per step do not split into {algorithm.mini_batches} mini-batches"
            )
        self.train_pool = self._encode(self.task.train())
        self.val_set = self._encode(self.task.test())[: run.val_size]
        if not self.train_pool or not self.val_set:
            raise ConfigError(f"task {run.task!r} has no prompts within run.max_prompt_tokens")
        self._order: list[int] = []
        self._order_rng = random.Random(seed)
        self.sampling = SamplingConfig(run.temperature, run.top_p, run.max_new_tokens, run.samples_per_prompt)
        self.autocast = (
            torch.autocast(run.device, dtype=getattr(torch, run.model.autocast)) if run.model.autocast else None
        )

    def _encode(self, examples):
        out = []
        for index, ex in enumerate(examples):
            ids = self.tokenizer(self.task.prompt(ex, self.tokenizer), add_special_tokens=False)["input_ids"]
            if 0 < len(ids) <= self.run.max_prompt_tokens:
                out.append((index, ids, ex))
        return out

    def _next_prompts(self) -> list[tuple[int, list[int], object]]:
        """Seeded order over the training pool, reshuffled each pass: the same for every algorithm."""
        picked = []
        while len(picked) < self.run.prompts_per_step:
            if not self._order:
                self._order = list(range(len(self.train_pool)))
                self._order_rng.shuffle(self._order)
            picked.append(self.train_pool[self._order.pop()])
        return picked

    # ------------------------------------------------------------------------------------------------
    def validate(self, step: int) -> float:
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=self.run.max_new_tokens, n=1)
        correct = 0.0
        for lo in range(0, len(self.val_set), self.run.val_batch_size):
            chunk = self.val_set[lo : lo + self.run.val_batch_size]
            rollout = generate(self.model, [ids for _, ids, _ in chunk], keys=[i for i, _, _ in chunk],
                               seed=self.seed, step=step, cfg=greedy, pad_id=self.pad_id, eos_id=self.eos_id)
            texts = self._decode(rollout)
            correct += sum(self.task.reward(t, ex.answer) for t, (_, _, ex) in zip(texts, chunk))
        return correct / len(self.val_set)

    def _decode(self, rollout) -> list[str]:
        ids = rollout.response_ids.masked_fill(rollout.response_mask == 0, self.pad_id)
        return self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        run = self.run
        t0 = time.perf_counter()
        if run.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        prompts = self._next_prompts()
        rollout = generate(self.model, [ids for _, ids, _ in prompts], keys=[i for i, _, _ in prompts],
                           seed=self.seed, step=step, cfg=self.sampling, pad_id=self.pad_id, eos_id=self.eos_id)
        texts = self._decode(rollout)
        answers = [prompts[g][2].answer for g in rollout.group_ids.tolist()]
        rewards = torch.tensor([self.task.reward(t, a) for t, a in zip(texts, answers)], dtype=torch.float32)
        t1 = time.perf_counter()

        batch = to_train_batch(rollout, self.pad_id)
        advantages, seq_adv = self._advantages(batch, rollout, rewards)
        stats = self._update(batch, advantages, seq_adv)
        t2 = time.perf_counter()

        kl = self._kl_new_old(batch)
        resp_len = rollout.response_lengths.float()
        return {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()), "kl": kl,
            "entropy": stats["entropy"], "grad_norm": stats["grad_norm"], "clip_frac": stats["clip_frac"],
            "response_len": float(resp_len.mean()), "loss": stats["loss"],
            "time_rollout_s": t1 - t0, "time_update_s": t2 - t1, "time_other_s": time.perf_counter() - t2,
            "peak_mem_mib": peak_memory_mib(run.device),
        }

    def _advantages(self, batch: TrainBatch, rollout, rewards: torch.Tensor):
        """Token advantages on the training layout (R, S) and, for ISOPO, one advantage per sequence."""
        resp_mask = rollout.response_mask.float()
        lengths = rollout.response_lengths
        rows = torch.arange(len(lengths))
        token_rewards = torch.zeros_like(resp_mask)
        token_rewards[rows, (lengths - 1).clamp(min=0)] = rewards * (lengths > 0)
        # Response token j of row r sits at training position (prompt_len − 1 + j).
        start = rollout.prompt_mask.sum(1) - 1
        cols = (start.unsqueeze(1) + torch.arange(resp_mask.shape[1])).clamp(max=batch.input_ids.shape[1] - 1)
        values = None
        if self.critic is not None:
            with torch.no_grad():
                values = self._critic_values(batch).gather(1, cols) * resp_mask
        estimator = ADV_ESTIMATORS.get(self.algo.adv_estimator)
        adv, returns = estimator(token_rewards, resp_mask, rollout.group_ids, values,
                                 norm_by_std=self.algo.norm_adv_by_std, gamma=self.algo.gamma, lam=self.algo.lam)
        full = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        valid = resp_mask.bool()
        full[rows.unsqueeze(1).expand_as(cols)[valid], cols[valid]] = adv[valid].float()
        self._returns = torch.zeros_like(full)
        self._returns[rows.unsqueeze(1).expand_as(cols)[valid], cols[valid]] = returns[valid].float()
        self._old_values = None
        if values is not None:
            self._old_values = torch.zeros_like(full)
            self._old_values[rows.unsqueeze(1).expand_as(cols)[valid], cols[valid]] = values[valid].float()
        return full, adv[:, 0].float()

    def _critic_values(self, batch: TrainBatch) -> torch.Tensor:
        out = []
        for lo in range(0, batch.input_ids.shape[0], self.run.micro_batch_size):
            rows = torch.arange(lo, min(lo + self.run.micro_batch_size, batch.input_ids.shape[0]))
            part = select_rows(batch, rows)
            v = self.critic(part)
            out.append(nn.functional.pad(v, (0, batch.input_ids.shape[1] - v.shape[1])))
        return torch.cat(out)

    def _update(self, batch: TrainBatch, advantages: torch.Tensor, seq_adv: torch.Tensor) -> dict:
        run, algo = self.run, self.algo
        n_rows = batch.input_ids.shape[0]
        per_mini = n_rows // algo.mini_batches
        loss_fn = POLICY_LOSSES.get(algo.policy_loss)
        losses, clips, norms, ent_sum, ent_count = [], [], [], 0.0, 0.0
        for _epoch in range(algo.epochs):
            for m in range(algo.mini_batches):
                mini = torch.arange(m * per_mini, (m + 1) * per_mini)
                mask_all = batch.response_mask[mini].float()
                agg = partial(agg_loss, mode=algo.loss_agg_mode, num_tokens=mask_all.sum(),
                              num_seqs=(mask_all.sum(1) > 0).sum(), norm_len=run.max_new_tokens)
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for lo in range(0, per_mini, run.micro_batch_size):
                    rows = mini[lo : lo + run.micro_batch_size]
                    part = select_rows(batch, rows)
                    loss, metrics, ent = self._micro_loss(part, advantages[rows, : part.input_ids.shape[1]],
                                                          seq_adv[rows], loss_fn, agg)
                    total += float(loss)
                    clips.append(float(metrics.get("clip_frac", 0.0)))
                    if ent is not None:
                        mask = part.response_mask.float()
                        ent_sum += float((ent.detach() * mask).sum())
                        ent_count += float(mask.sum())
                if self.isopo is not None:
                    self.isopo.end_step()
                limit = run.grad_clip if run.grad_clip > 0 else math.inf
                norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), limit))
                if not math.isfinite(total) or not math.isfinite(norm):
                    raise Diverged(f"non-finite loss ({total}) or gradient norm ({norm})")
                self.optimizer.step()
                losses.append(total)
                norms.append(norm)
                if self.critic is not None:
                    self._critic_update(batch, mini)
        return {
            "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms),
            "clip_frac": sum(clips) / len(clips), "entropy": ent_sum / max(ent_count, 1.0),
        }

    def _micro_loss(self, part: TrainBatch, adv: torch.Tensor, seq_adv: torch.Tensor, loss_fn, agg: Callable):
        algo = self.algo
        mask = part.response_mask.float()
        scope = self.autocast or nullcontext()
        if self.isopo is not None:
            first = logits_start(part)
            rows, cols = part.seq_ids.shape
            # The LM head sees only columns first..S-1 (token_log_probs keeps logits from there on).
            views = [torch.arange(rows * cols, device=part.seq_ids.device).view(rows, cols)[:, first:]] if first else []
            with self.isopo.micro_batch(part.seq_ids, seq_adv, views=views):
                with scope:
                    logp, ent = token_log_probs(self.model, part, self.run.temperature, with_entropy=True)
                # The advantage-free loss: ISOPO puts the advantages into every layer's gradient itself.
                loss = agg(-logp, mask)
                loss.backward()
            return loss.detach(), {}, ent
        with scope:
            logp, ent = token_log_probs(self.model, part, self.run.temperature, with_entropy=True)
        old = part.old_log_probs if algo.needs_old_log_prob else logp.detach()
        loss, metrics = loss_fn(logp, old, adv, mask, agg=agg, clip_ratio_low=algo.clip_ratio_low,
                                clip_ratio_high=algo.clip_ratio_high, clip_ratio_c=algo.clip_ratio_c)
        if algo.kl_coef > 0:
            with torch.no_grad():
                ref_logp, _ = token_log_probs(self.reference, part, self.run.temperature)
            loss = loss + algo.kl_coef * agg(kl_penalty(logp, ref_logp, algo.kl_kind), mask)
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * agg(ent, mask)
        loss.backward()
        return loss.detach(), metrics, ent

    def _critic_update(self, batch: TrainBatch, mini: torch.Tensor) -> None:
        mask_all = batch.response_mask[mini].float()
        agg = partial(agg_loss, mode="token-mean", num_tokens=mask_all.sum(), num_seqs=None, norm_len=None)
        self.critic_opt.zero_grad(set_to_none=True)
        for lo in range(0, len(mini), self.run.micro_batch_size):
            rows = mini[lo : lo + self.run.micro_batch_size]
            part = select_rows(batch, rows)
            width = part.input_ids.shape[1]
            values = self.critic(part)
            loss, _ = value_loss(values, self._old_values[rows, :width], self._returns[rows, :width],
                                 part.response_mask.float(), agg=agg, cliprange_value=self.algo.cliprange_value)
            loss.backward()
        limit = self.run.grad_clip if self.run.grad_clip > 0 else math.inf
        nn.utils.clip_grad_norm_(self.critic.parameters(), limit)
        self.critic_opt.step()

    def _kl_new_old(self, batch: TrainBatch) -> float:
        """KL(π_new ‖ π_old) per response token, from the rollout's own samples (drawn from π_old):
        E_old[r log r] with r = π_new/π_old."""
        total, count = 0.0, 0.0
        with torch.no_grad():
            for lo in range(0, batch.input_ids.shape[0], self.run.micro_batch_size):
                rows = torch.arange(lo, min(lo + self.run.micro_batch_size, batch.input_ids.shape[0]))
                part = select_rows(batch, rows)
                new, _ = token_log_probs(self.model, part, self.run.temperature)
                mask = part.response_mask.float()
                log_r = (new - part.old_log_probs).clamp(-20, 20)
                total += float((torch.exp(log_r) * log_r * mask).sum())
                count += float(mask.sum())
        return total / max(count, 1.0)

    # ------------------------------------------------------------------------------------------------
    def fit(self, on_row: Callable[[dict], None] | None = None, progress: bool = False) -> RunResult:
        with self.isopo.installed() if self.isopo is not None else nullcontext():
            return self._fit(on_row, progress)

    def _fit(self, on_row, progress) -> RunResult:
        result = RunResult()
        start = time.perf_counter()
        nan_row = dict.fromkeys(METRIC_COLUMNS, math.nan)
        row = {**nan_row, "step": 0, "val_acc": self.validate(0)}
        result.rows.append(row)
        if on_row:
            on_row(row)
        bar = tqdm(range(1, self.run.steps + 1), desc=f"{self.algo.name} seed {self.seed}", disable=not progress,
                   leave=False)
        for step in bar:
            try:
                metrics = self.step(step)
                val_start = time.perf_counter()
                due = step % self.run.val_every == 0 or step == self.run.steps
                val = self.validate(step) if due else math.nan
                metrics["time_other_s"] += time.perf_counter() - val_start
            except Diverged:
                result.status, result.diverged_step = "diverged", step
                row = {**nan_row, "step": step}
                result.rows.append(row)
                if on_row:
                    on_row(row)
                break
            row = {**nan_row, **metrics, "step": step, "val_acc": val}
            result.rows.append(row)
            if on_row:
                on_row(row)
            if due:
                bar.set_postfix(val_acc=f"{val:.3f}")
        result.wall_s = time.perf_counter() - start
        return result


def train_run(run: RunConfig, algorithm: str, seed: int, cache_dir: Path, per_algorithm: dict | None = None,
              on_row=None, progress: bool = False) -> RunResult:
    algo = resolve_algorithm(algorithm, run, per_algorithm)
    return Trainer(run, algo, seed, cache_dir).fit(on_row=on_row, progress=progress)
