"""`nanoseek grpo`: reinforcement learning from verifiable rewards, as in DeepSeek-R1 (GRPO and its variants).

    nanoseek grpo --model runs/sft/final --task arithmetic --steps 100 --group-size 8 --prompts-per-step 8
    nanoseek grpo ... --loss-type dapo          # token-level mean, clip-higher, dynamic sampling, overlong shaping
    nanoseek grpo ... --resume                  # continue a killed run from its latest checkpoint

Each step: P prompts from the task -> G completions each from the nanoseek engine (sharing the model's weights,
so the engine always samples from the current policy) -> rewards from the task's reward functions ->
group-normalized advantages -> mu passes of clipped-ratio updates over the batch, optionally with the k3 KL to a
frozen reference (beta > 0; beta = 0 keeps no reference). The losses are nanoseek.train.rl's pure functions.

Prompts for step s are a pure function of (seed, s), and so are the engine's sampling seeds: with the weights and
optimizer restored from a checkpoint, a resumed run continues exactly. One process (the engine and trainer
share the model); use the GPU when there is one.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.errors import ConfigError
from nanoseek.train.config import TrainConfig, add_config_arguments, option
from nanoseek.train.rl import LOSS_TYPES

HELP = "GRPO / Dr. GRPO / DAPO / BNPO from verifiable rewards, rollouts by the nanoseek engine"


@dataclass
class GRPOConfig(TrainConfig):
    out: str = option("runs/grpo", "run dir: metrics.jsonl, plots, config, checkpoints/, final/ (HF format)")
    steps: int = option(100, "RL steps (one rollout batch each)")
    save_every: int = option(50, "save a resumable checkpoint every N steps (and at the end); 0: only at the end")
    lr: float = option(1e-5, "peak learning rate")
    warmup_steps: int = option(0, "linear warmup steps")
    lr_schedule: str = option("cosine", "warmup then cosine decay, or warmup-stable-decay", ("cosine", "wsd"))
    min_lr_ratio: float = option(1.0, "final lr as a fraction of the peak (1: constant, as R1-Zero)")
    weight_decay: float = option(0.0, "AdamW weight decay on matrices")
    batch_size: int | None = option(None, "sequences per optimizer step (default: all P x G of a rollout; "
                                          "smaller: several optimizer steps per rollout)")
    seq_len: int = option(1024, "context for prompt + completion (the engine's max_model_len); prompts that "
                                "leave less than max_new_tokens are skipped with a warning")
    task: str = option("arithmetic", "task name (nanoseek.data.tasks) or a .jsonl/.json/.parquet problems file")
    difficulty: int = option(1, "task difficulty 1-5")
    reward: str = option("accuracy=1,format_strict=0.1", "reward terms name=weight (accuracy, format_strict, "
                                                          "format_soft, code)")
    system_prompt: str | None = option(None, "system message before each problem")
    group_size: int = option(8, "completions per prompt (G)")
    prompts_per_step: int = option(8, "prompts per rollout batch (P)")
    max_new_tokens: int = option(256, "completion length cap")
    temperature: float = option(1.0, "sampling temperature (the policy's log-probs use the same)")
    loss_type: str = option("grpo", "grpo: per-sequence mean; bnpo: tokens in the batch; dr_grpo: no std "
                                    "scaling, constant normalizer; dapo: token mean + clip-higher + dynamic "
                                    "sampling + overlong shaping", LOSS_TYPES)
    compile_rollouts: bool = option(False, "torch.compile the rollout engine's decode step: ~40-60 s of compilation "
                                           "up front, then rollouts ~1.7x faster on CPU (benchmarks/RESULTS.md)")
    beta: float = option(0.0, "weight of the k3 KL to the frozen initial policy (0: no reference model kept)")
    mu: int = option(1, "policy updates per rollout batch (ratios against the rollout policy's log-probs)")
    eps_low: float = option(0.2, "clip range below: ratio >= 1 - eps_low")
    eps_high: float | None = option(None, "clip range above (default: 0.28 for dapo, else eps_low)")
    dynamic_sampling: bool | None = option(None, "drop all-correct/all-wrong groups and sample more prompts "
                                                 "(default: on for dapo)")
    max_refills: int = option(4, "dynamic sampling: extra rollout batches per step at most")
    overlong_buffer: int | None = option(None, "DAPO soft overlong penalty over the last N tokens of "
                                               "max_new_tokens (default: max_new_tokens/4 for dapo, else 0)")

    def validate(self) -> None:
        if self.batch_size is None:
            self.batch_size = self.group_size * self.prompts_per_step
        super().validate()
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "mu"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name!r} = {getattr(self, name)!r}: must be >= 1")
        if self.group_size < 2:
            raise ConfigError("config field 'group_size' = 1: GRPO needs >= 2 completions per prompt")
        if (self.group_size * self.prompts_per_step) % self.batch_size:
            raise ConfigError(f"batch_size {self.batch_size} must divide group_size x prompts_per_step "
                              f"({self.group_size * self.prompts_per_step})")
        if self.beta < 0 or self.temperature <= 0 or self.eps_low < 0:
            raise ConfigError("beta and eps_low must be >= 0 and temperature > 0")
        dapo = self.loss_type == "dapo"
        if self.eps_high is None:
            self.eps_high = 0.28 if dapo else self.eps_low                 # DAPO paper, section 3.1
        if self.dynamic_sampling is None:
            self.dynamic_sampling = dapo
        if self.overlong_buffer is None:
            self.overlong_buffer = self.max_new_tokens // 4 if dapo else 0
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ConfigError(f"overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens}]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, GRPOConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.run import run_config

    cfg = run_config(GRPOConfig, args)
    grpo(cfg)
    return 0


def load_policy(cfg: TrainConfig, device):
    """(model, tokenizer) from --model: a checkpoint dir (its tokenizer unless --tokenizer), or a preset /
    config file for a fresh model, which then needs --tokenizer."""
    import nanoseek
    from nanoseek.model import build_model
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.run import resolve_model

    model_cfg, ckpt = resolve_model(cfg.model)
    if cfg.tokenizer is None and ckpt is None:
        raise ConfigError(f"--model {cfg.model!r} is a fresh model: give --tokenizer DIR too")
    tokenizer = Tokenizer.from_dir(cfg.tokenizer or ckpt)
    if ckpt is not None:
        model = nanoseek.load_model(ckpt, device=device)
    else:
        model = build_model(model_cfg.replace(vocab_size=tokenizer.vocab_size), seed=cfg.seed, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model embeds only "
                          f"{model.config.vocab_size}")
    return model, tokenizer


def grpo(cfg: GRPOConfig, reward_fns: dict | None = None) -> dict:
    """Train as `cfg` says. reward_fns ({name or fn: weight}) replaces cfg.reward (Python API: custom rewards).
    Returns {"step", "reward", "run_dir"}."""
    import torch
    from tqdm import tqdm

    from nanoseek import scratch
    from nanoseek.checkpoint.native import export_hf, gather_state
    from nanoseek.data.tasks import get_task
    from nanoseek.parallel import distributed as D
    from nanoseek.rewards import accuracy_reward
    from nanoseek.train import run as R
    from nanoseek.train.loop import autocast, resolve_precision, seed_all, tune_allocator
    from nanoseek.train.metrics import MetricsLog, plot_curves, read_metrics
    from nanoseek.train.optim import build_optimizer, clipped_step, set_lr
    from nanoseek.train.rl import group_advantages, informative_groups, policy_loss
    from nanoseek.train.logprobs import completion_logprobs, sequence_batch
    from nanoseek.train.rollout import Rollout, RolloutError, parse_reward_spec, rollout, rollout_engine
    from nanoseek.train.schedules import lr_at

    # ------------------------------------------------------------------ setup: checks first, before any work
    dist = D.init_distributed(cfg.device)
    if dist.world_size > 1 or cfg.fsdp:
        raise ConfigError("grpo runs in one process (engine and trainer share the model); drop torchrun/--fsdp")
    unsupported = [f"--{n.replace('_', '-')}" for n in ("compile", "activation_checkpointing", "fp8") if getattr(cfg, n)]
    if unsupported:   # the engine decodes with the same modules, so these wrappers are not applied to GRPO yet
        raise ConfigError(f"grpo does not support {', '.join(unsupported)} yet; drop the flag"
                          f"{' (--compile-rollouts compiles the rollout engine)' if cfg.compile else ''}")
    run_dir = Path(cfg.out)
    resume_from = R.find_resume_point(run_dir, cfg.resume)
    precision = resolve_precision(cfg.precision, dist.device, warn=dist.is_main)
    seed_all(cfg.seed)
    tune_allocator()                    # keep freed activation blocks in the process (glibc; see loop.py)
    terms = parse_reward_spec(reward_fns if reward_fns is not None else cfg.reward)
    task = get_task(cfg.data[0] if cfg.data else cfg.task)
    model, tokenizer = load_policy(cfg, dist.device)
    mcfg = model.config
    # beta == 0: the KL term vanishes, so no reference copy is kept (saves a model's memory and a forward)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    R.write_run_files(run_dir, cfg.to_dict(), mcfg, dist, precision=precision,
                      resumed_from=str(resume_from) if resume_from else None)
    tokenizer.save(run_dir / "tokenizer")
    optimizer = build_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    start = 0
    if resume_from is not None:
        start = R.load_training_checkpoint(resume_from, model, optimizer, dist, loaders={},
                                           model_config=mcfg)["step"]
    llm = rollout_engine(model, tokenizer, max_model_len=min(cfg.seq_len, mcfg.max_position_embeddings),
                         max_num_seqs=cfg.group_size * cfg.prompts_per_step, compile=cfg.compile_rollouts)
    if cfg.compile_rollouts:
        print("grpo: compiling the rollout engine's decode step ...", flush=True)
        llm.warmup()
    metrics = MetricsLog(run_dir, resume_step=start if resume_from else None)
    G, P = cfg.group_size, cfg.prompts_per_step
    print(f"grpo: {cfg.loss_type}, G={G} x P={P}, mu={cfg.mu}, beta={cfg.beta}, eps {cfg.eps_low}/{cfg.eps_high}, "
          f"dynamic sampling {'on' if cfg.dynamic_sampling else 'off'}, task {task.name}, rewards "
          f"{', '.join(f'{n}={w:g}' for n, _, w in terms)}; steps {start} -> {cfg.steps} on {dist.device}",
          flush=True)

    def collect(step: int) -> tuple[Rollout | None, dict]:
        """A scored rollout of P groups for this step (dynamic sampling: informative groups only, refilled)."""
        got, seen, drawn, errors = [], 0, 0, []
        for attempt in range(1 + (cfg.max_refills if cfg.dynamic_sampling else 0)):
            items = task.generate(P, seed=(cfg.seed * 100_003 + step) * 31 + attempt, difficulty=cfg.difficulty)
            r = rollout(llm, tokenizer, items, terms, G, cfg.max_new_tokens, cfg.temperature,
                        seed=cfg.seed + 7919 * step + attempt, system_prompt=cfg.system_prompt,
                        overlong_buffer=cfg.overlong_buffer)
            drawn += len(items)
            errors += r.errors
            if r.num_groups == 0:
                continue
            seen += r.num_groups
            got.append(r)
            if not cfg.dynamic_sampling:
                break
            keep = informative_groups(r.rewards, G).nonzero().flatten().tolist()
            got[-1] = r.select(keep)
            if sum(x.num_groups for x in got) >= P:
                break
        stats = {"errors": errors, "drawn": drawn, "seen": seen}
        if not got or sum(x.num_groups for x in got) == 0:
            return None, stats
        r = Rollout.concat(got)
        r = r.select(list(range(min(P, r.num_groups))))
        return r, stats

    def save(step: int) -> dict:
        state = R.save_training_checkpoint(run_dir, step, model, optimizer, dist, loaders={},
                                           keep_last=cfg.keep_last, config=cfg.to_dict(), model_config=mcfg.to_hf())
        records = read_metrics(run_dir)
        plot_curves(records, ["reward", "accuracy"] + [f"reward_{n}" for n, _, _ in terms],
                    run_dir / "reward.png", "reward", "mean over completions")
        plot_curves(records, ["kl", "clip_low", "clip_high", "zero_std_frac", "truncated"], run_dir / "policy.png",
                    "policy statistics", "")
        plot_curves(records, ["response_length"], run_dir / "length.png", "response length", "tokens")
        return state

    # ------------------------------------------------------------------ the loop
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    warned: set[str] = set()
    state, reward = None, float("nan")
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio, cfg.decay_frac)
        set_lr(optimizer, lr)
        model.eval()                                 # the engine samples; no dropout either way, but be explicit
        r, stats = collect(step)
        for msg in stats["errors"]:
            if msg not in warned:
                warned.add(msg)
                tqdm.write(f"grpo: warning: {msg}")
        if r is None:
            if stats["seen"] == 0 and stats["drawn"] > 0 and stats["errors"]:
                raise RolloutError(f"step {step + 1}: no usable group: {stats['errors'][-1]}; fix the reward "
                                   f"function or the prompts (checkpoints are untouched)")
            tqdm.write(f"grpo: step {step + 1}: every group had equal rewards; no update")
            metrics.log({"step": step + 1, "lr": lr, "skipped": 1, "step_time": time.perf_counter() - t0})
            bar.update(1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                state = save(step + 1)
            continue

        # advantages: group-normalized (Dr. GRPO: not divided by the group std)
        adv = group_advantages(r.rewards, G, scale_std=cfg.loss_type != "dr_grpo")          # (S,)
        batch = sequence_batch(r.prompts, r.completions, G, tokenizer.pad_id or 0)
        S = len(r.completions)
        with torch.no_grad(), autocast(dist.device, precision):
            # mu == 1: the ratio is exactly 1 (old = logp.detach()); mu > 1: the rollout policy's log-probs
            old = completion_logprobs(model, batch, cfg.temperature)[0] if cfg.mu > 1 else None
            ref_lp = completion_logprobs(ref, batch, cfg.temperature)[0] if ref is not None else None
        n_tokens = batch.mask.sum().item()
        micro = cfg.micro_batch_size or cfg.batch_size
        acc = {"loss": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "entropy": 0.0, "grad_norm": 0.0}
        model.train()
        for it in range(cfg.mu):
            for b0 in range(0, S, cfg.batch_size):                  # S / batch_size optimizer steps per pass
                chunk_tokens = batch.mask[b0:b0 + cfg.batch_size].sum().item()
                for m0 in range(b0, b0 + cfg.batch_size, micro):
                    rows = slice(m0, min(m0 + micro, b0 + cfg.batch_size))
                    with autocast(dist.device, precision):
                        logp, ent = completion_logprobs(model, batch, cfg.temperature, with_entropy=it == 0,
                                                        rows=rows)
                    mask = batch.mask[rows].to(logp.device)
                    n_rows = logp.shape[0]
                    pl = policy_loss(logp, old[rows] if old is not None else logp.detach(), adv[rows].to(logp.device),
                                     mask, cfg.loss_type, cfg.eps_low, cfg.eps_high, cfg.beta,
                                     ref_lp[rows] if ref_lp is not None else None, cfg.max_new_tokens,
                                     num_tokens=max(chunk_tokens, 1.0))
                    # micro-batch losses add up to the optimizer step's loss: sequence means weigh by rows,
                    # bnpo's token mean by tokens (dapo already divides by the chunk's token count)
                    share = {"grpo": n_rows / cfg.batch_size, "dr_grpo": n_rows / cfg.batch_size,
                             "bnpo": mask.sum().item() / max(chunk_tokens, 1.0), "dapo": 1.0}[cfg.loss_type]
                    (pl.loss * share).backward()
                    w = mask.sum().item() / max(n_tokens, 1.0) / cfg.mu
                    acc["loss"] += pl.loss.item() * share * cfg.batch_size / S / cfg.mu
                    for k in ("kl", "clip_low", "clip_high"):
                        acc[k] += getattr(pl, k).item() * w
                    if ent is not None:
                        acc["entropy"] += ((ent * mask).sum() / max(n_tokens, 1.0)).item()
                acc["grad_norm"] = clipped_step(optimizer, model.parameters(), cfg.grad_clip)
                optimizer.zero_grad(set_to_none=True)
        # the engine shares `model`: the next rollout samples from the updated weights with nothing to copy

        seconds = time.perf_counter() - t0
        reward = r.rewards.mean().item()
        accuracy = r.parts["accuracy"].mean().item() if "accuracy" in r.parts else \
            sum(accuracy_reward(t, it) for t, it in zip(r.texts, [i for i in r.items for _ in range(G)])) / S
        lengths = torch.tensor([len(c) for c in r.completions], dtype=torch.float)
        zero_std = 1.0 - informative_groups(r.rewards, G).float().mean().item()
        record = {"step": step + 1, "loss": acc["loss"], "lr": lr, "reward": reward,
                  "reward_std": r.rewards.std().item(),
                  **{f"reward_{k}": v.mean().item() for k, v in r.parts.items()}, "accuracy": accuracy,
                  "response_length": lengths.mean().item(), "truncated": sum(r.truncated) / S,
                  "kl": acc["kl"], "clip_low": acc["clip_low"], "clip_high": acc["clip_high"],
                  "entropy": acc["entropy"], "zero_std_frac": zero_std, "grad_norm": acc["grad_norm"],
                  "prompts_sampled": stats["drawn"], "reward_errors": len(stats["errors"]),
                  "completions_per_s": stats["seen"] * G / max(r.seconds, 1e-9), "tokens_per_s": n_tokens / seconds,
                  "step_time": seconds, "rollout_time": r.seconds}
        metrics.log(record)
        bar.update(1)
        bar.set_postfix_str(f"reward {reward:.3f} | acc {accuracy:.2f} | len {record['response_length']:.0f} | "
                            f"kl {acc['kl']:.4f} | clip {acc['clip_low']:.2f}/{acc['clip_high']:.2f} | "
                            f"{record['completions_per_s']:.0f} compl/s")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            state = save(step + 1)
    bar.close()
    metrics.close()
    scratch.release()                   # the loop's per-thread temporaries

    # ------------------------------------------------------------------ save: the final policy in HF format
    if state is None:
        state = gather_state(model, optimizer)[0]
    export_hf(mcfg, state, run_dir / "final", tokenizer)
    print(f"grpo: step {max(start, cfg.steps)}, reward {reward:.4f}; model in {run_dir / 'final'}", flush=True)
    return {"step": max(start, cfg.steps), "reward": reward, "run_dir": str(run_dir)}
