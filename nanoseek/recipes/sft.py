"""`nanoseek sft`: supervised fine-tuning on conversations (R1's cold start, or distillation traces).

    nanoseek sft --model runs/pretrain/final --data chats.jsonl --steps 200 --out runs/sft
    nanoseek sft ... --resume                   # continue from the latest checkpoint
    torchrun --nproc_per_node 8 -m nanoseek sft --config sft.yaml

Data: OpenAI-style {"messages": [...]} jsonl, rendered by the checkpoint's chat template (R1's by default); the
loss is on assistant tokens only (and a final turn's <think> reasoning is kept, as the model writes it).
--pack puts several conversations in one row of seq_len tokens with a block-diagonal attention mask and
positions restarting at each conversation, so packing changes the speed, never the math (unlike pretraining,
where cross-document attention is harmless and V3 does not mask it).

Optional logit distillation (used by `nanoseek distill`): with a local teacher over the same vocabulary, the loss
is (1 - kd_weight) CE + kd_weight forward KL(teacher || student) on the same assistant tokens.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.errors import ConfigError, NanoseekError
from nanoseek.train.config import TrainConfig, add_config_arguments, option

HELP = "supervised fine-tuning on chat conversations (assistant-only loss, packing), resumable"


@dataclass
class SFTConfig(TrainConfig):
    out: str = option("runs/sft", "run dir: metrics.jsonl, plots, config, checkpoints/, final/ (HF format)")
    steps: int = option(200, "optimizer steps to train (the data repeats in reshuffled epochs as needed)")
    save_every: int = option(100, "save a resumable checkpoint every N steps (and at the end); 0: only at the end")
    lr: float = option(5e-5, "peak learning rate")
    warmup_steps: int = option(10, "linear warmup steps")
    seq_len: int = option(1024, "tokens per row; longer conversations are cut")
    data_field: str = option("messages", "the conversation field of each jsonl record")
    pack: bool = option(True, "pack several conversations per row (block-diagonal attention)")

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ConfigError("sft needs --data FILE.jsonl of {\"messages\": [...]} conversations")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SFTConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.run import run_config

    cfg = run_config(SFTConfig, args)
    try:
        sft(cfg)
    except NanoseekError:
        if int(os.environ.get("RANK", "0")) != 0:
            return 2
        raise
    return 0


def packed_layout(doc_ids):
    """doc_ids (B,T) (-1 on padding) -> positions (B,T) restarting at each conversation, and the attention mask
    (B,1,T,T): causal within a conversation. Padding attends to padding (an all-False row would give NaN)."""
    import torch

    B, T = doc_ids.shape
    t = torch.arange(T)
    starts = torch.zeros_like(doc_ids)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(new, t.expand(B, T), torch.zeros_like(doc_ids)).cummax(dim=1).values
    positions = t[None, :] - starts
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = t[None, :, None] >= t[None, None, :]
    return positions, (same & causal)[:, None]


def sft(cfg: SFTConfig, teacher=None, kd_weight: float = 0.0, kd_temperature: float = 1.0) -> dict:
    """Train as `cfg` says; teacher (a model over the student's vocabulary) adds logit distillation.
    Returns {"step", "loss", "run_dir"}."""
    import torch
    from tqdm import tqdm

    from nanoseek import scratch
    from nanoseek.checkpoint.native import export_hf, gather_state
    from nanoseek.data.sft import SFTLoader
    from nanoseek.parallel import distributed as D
    from nanoseek.parallel import grad_sync, parallelize
    from nanoseek.recipes.grpo import load_policy
    from nanoseek.train import run as R
    from nanoseek.train.kd import forward_kl
    from nanoseek.train.loop import autocast, resolve_precision, seed_all, tune_allocator
    from nanoseek.train.losses import cross_entropy
    from nanoseek.train.metrics import MetricsLog, plot_curves, read_metrics
    from nanoseek.train.optim import build_optimizer, clipped_step, set_lr
    from nanoseek.train.schedules import lr_at

    # ------------------------------------------------------------------ setup
    dist = D.init_distributed(cfg.device)
    run_dir = Path(cfg.out)
    micro = cfg.micro_batch_size or max(cfg.batch_size // dist.world_size, 1)
    if cfg.batch_size % (dist.world_size * micro):
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of processes x micro_batch_size "
                          f"({dist.world_size} x {micro})")
    cfg.micro_batch_size = micro
    accum = cfg.batch_size // (dist.world_size * micro)
    resume_from = R.find_resume_point(run_dir, cfg.resume)
    precision = resolve_precision(cfg.precision, dist.device, warn=dist.is_main)
    seed_all(cfg.seed)
    tune_allocator()                    # keep freed activation blocks in the process (glibc; see loop.py)
    model, tokenizer = load_policy(cfg, dist.device)
    model.train()
    mcfg = model.config
    if teacher is not None and kd_weight > 0 and teacher.config.vocab_size != mcfg.vocab_size:
        raise ConfigError(f"logit distillation needs a shared vocabulary: teacher {teacher.config.vocab_size} ids, "
                          f"student {mcfg.vocab_size}; use trace distillation only (--kd-weight 0)")
    data = cfg.data[0] if len(cfg.data) == 1 else None
    if data is None:
        raise ConfigError("sft takes one --data file")
    from nanoseek.data.sft import load_conversations

    convs = load_conversations(data, field=cfg.data_field)
    loader = SFTLoader(tokenizer, convs, batch_size=micro, seq_len=cfg.seq_len, pack=cfg.pack, seed=cfg.seed,
                       rank=dist.rank, world_size=dist.world_size)
    R.write_run_files(run_dir, cfg.to_dict(), mcfg, dist, precision=precision,
                      resumed_from=str(resume_from) if resume_from else None)
    train_model = parallelize(model, dist, fsdp=cfg.fsdp, compile=cfg.compile,
                              activation_checkpointing=cfg.activation_checkpointing, fp8=cfg.fp8)
    optimizer = build_optimizer(train_model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    start = 0
    if resume_from is not None:
        start = R.load_training_checkpoint(resume_from, train_model, optimizer, dist, loaders={dist.rank: loader},
                                           model_config=mcfg)["step"]
    metrics = MetricsLog(run_dir, enabled=dist.is_main, resume_step=start if resume_from else None)
    if dist.is_main:
        print(f"sft: {len(loader.ids)} conversations ({loader.n_truncated} cut, {loader.n_dropped} without "
              f"assistant tokens) from {data}; {cfg.batch_size} {'rows' if cfg.pack else 'conversations'} x "
              f"{cfg.seq_len} tokens per step{f', KD weight {kd_weight}' if teacher is not None else ''}; "
              f"steps {start} -> {cfg.steps}", flush=True)

    # ------------------------------------------------------------------ the loop
    bar = tqdm(total=cfg.steps, initial=start, disable=not (dist.is_main and cfg.progress), unit="step",
               dynamic_ncols=True)
    loss, state = float("nan"), None
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio, cfg.decay_frac)
        set_lr(optimizer, lr)
        batches = [next(loader) for _ in range(accum)]
        # the step's loss is the mean over all its assistant tokens (every micro-batch and rank), not a mean of
        # per-batch means, which would over-weight short conversations
        n_tok = D.all_reduce_sum(torch.tensor(float(sum(b.loss_mask[:, 1:].sum() for b in batches)),
                                              dtype=torch.float64)).item()
        parts = torch.zeros(3, dtype=torch.float64)                            # loss, ce, kd
        for i, b in enumerate(batches):
            inputs, targets = b.inputs.to(dist.device), b.targets.to(dist.device)
            mask = b.loss_mask[:, 1:].to(dist.device)
            pos, attn = packed_layout(b.doc_ids[:, :-1]) if cfg.pack else (None, None)
            kw = {"positions": pos.to(dist.device), "attn_mask": attn.to(dist.device)} if cfg.pack else {}
            with grad_sync(train_model, sync=i == len(batches) - 1):
                with autocast(dist.device, precision):
                    kd = torch.zeros((), device=inputs.device)
                    if teacher is None or kd_weight == 0:
                        # no distribution to match: lm_head fused into the loss, the (B,T,V) logits never built
                        hidden = train_model(inputs, compute_logits=False, **kw).hidden       # (B,T,H)
                        ce = cross_entropy(hidden, targets, mask, max(n_tok, 1.0), model.lm_head.weight)
                    else:
                        logits = train_model(inputs, **kw)                                    # (B,T,V)
                        ce = cross_entropy(logits, targets, mask, max(n_tok, 1.0))
                        with torch.no_grad():
                            t_logits = teacher(inputs, **kw)
                        kd = forward_kl(logits, t_logits, mask, kd_temperature, max(n_tok, 1.0))
                    total = (1 - kd_weight) * ce + kd_weight * kd if teacher is not None else ce
                (total * dist.world_size).backward()                            # DDP averages; our loss is global
            parts += torch.stack([total.detach(), ce.detach(), kd.detach()]).double().cpu()
        grad_norm = clipped_step(optimizer, train_model.parameters(), cfg.grad_clip)
        optimizer.zero_grad(set_to_none=True)
        loss, ce, kd = D.all_reduce_sum(parts).tolist()
        seconds = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": loss, "ce": ce, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": n_tok / seconds, "epoch": loader.epoch, "step_time": seconds}
        if teacher is not None:
            rec["kd"] = kd
        metrics.log(rec)
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.3f} | epoch {loader.epoch} | {n_tok / seconds:,.0f} tok/s")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            state = R.save_training_checkpoint(run_dir, step + 1, train_model, optimizer, dist,
                                               loaders={dist.rank: loader}, keep_last=cfg.keep_last,
                                               config=cfg.to_dict(), model_config=mcfg.to_hf())
            if dist.is_main:
                plot_curves(read_metrics(run_dir), ["loss", "ce", "kd"], run_dir / "loss.png", "SFT loss", "loss")
    bar.close()
    metrics.close()
    scratch.release()                   # the loop's per-thread temporaries

    # ------------------------------------------------------------------ save
    if state is None:
        state = gather_state(train_model, optimizer)[0]
    if dist.is_main:
        export_hf(mcfg, state, run_dir / "final", tokenizer)
        print(f"sft: step {max(start, cfg.steps)}, loss {loss:.4f}; model in {run_dir / 'final'}", flush=True)
    D.barrier()
    D.shutdown()
    return {"step": max(start, cfg.steps), "loss": loss, "run_dir": str(run_dir)}
