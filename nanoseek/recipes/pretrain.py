"""`nanoseek pretrain`: pretrain a DeepSeek-V3-architecture model, from one CPU to many GPUs under torchrun.

    nanoseek pretrain --model tiny --steps 40 --save-every 10 --out runs/tiny            # generated corpus
    nanoseek pretrain --model tiny --steps 40 --save-every 10 --out runs/tiny --resume   # continue a killed run
    torchrun --nproc_per_node 8 -m nanoseek pretrain --config pretrain.yaml --fsdp

The V3 recipe (DeepSeek-V3 report, sections 2-4):
  loss = CE(next token) + lambda * mean_k CE(MTP depth k) + alpha * sum_layers sequence-wise balance loss
  after each optimizer step, every MoE gate's selection bias moves: b_i += gamma * sign(mean_load - load_i)
  AdamW (0.9, 0.95), weight decay 0.1, gradient clip 1.0; documents packed into rows with no cross-document
  attention mask (as V3: "we do not incorporate cross-sample attention masking").

Run dir (--out): metrics.jsonl (one line per step), loss.png and expert_load.png, config.yaml (resolved; the base
of --resume), run.json (git revision, launches), tokenizer/, checkpoints/step_N/ (atomic, newest --keep-last),
final/ (HF format with the tokenizer, written at the end). `--resume --steps N` on a run already at step N
trains nothing and re-exports its latest checkpoint to final/.

Data layout: the global batch of B sequences is dealt into B / micro_batch_size streams, one per (rank,
micro-step); each stream is a rank-sharded PretrainLoader over its own share of the documents. A step therefore
sees the same sequences for any number of processes that divides the streams: adding processes changes the
speed, not the losses (beyond float rounding).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.errors import ConfigError, NanoseekError
from nanoseek.train.config import TrainConfig, add_config_arguments, option
from nanoseek.train.schedules import parse_piecewise

HELP = "pretrain a DeepSeek-V3-style model (MTP, aux-loss-free balancing) on CPU, GPU or torchrun DDP/FSDP2"
CORPUS_DOCS = 10_000   # the generated corpus when no --data: ~0.6M tokens, repeated as long as training runs
PLOT_EVERY_S = 60      # plots are redrawn at checkpoints at most this often (a plot costs ~0.1 s) and at the end


@dataclass
class PretrainConfig(TrainConfig):
    tokens: int | None = option(None, "train on this many tokens instead of --steps (steps = tokens / "
                                      "(batch_size x seq_len), rounded up)")
    mtp_weight: str = option("0.3,0.1@0.676", "MTP loss weight lambda over training: 'V' or 'V0,V1@F1,...' "
                                              "(V1 from fraction F1 of the steps on; V3: 0.3 for 10T of 14.8T "
                                              "tokens, then 0.1)")
    bias_update_speed: str = option("0.001,0@0.966", "aux-loss-free balancing speed gamma, as --mtp-weight "
                                                     "(V3: 0.001, then 0 for the last 500B tokens); 0: off")
    balance_alpha: float = option(1e-4, "weight alpha of the sequence-wise balance loss (V3: 1e-4); 0: off")

    def validate(self) -> None:
        super().validate()
        if self.tokens is not None:
            if self.tokens < 1:
                raise ConfigError(f"config field 'tokens' = {self.tokens!r}: must be >= 1")
            # resolved once, so the saved config (the base of --resume) holds steps only
            self.steps, self.tokens = math.ceil(self.tokens / (self.batch_size * self.seq_len)), None
        parse_piecewise(self.mtp_weight, "mtp_weight")             # a bad spec fails here, before training
        parse_piecewise(self.bias_update_speed, "bias_update_speed")
        if self.balance_alpha < 0:
            raise ConfigError(f"config field 'balance_alpha' = {self.balance_alpha!r}: must be >= 0")

    @property
    def mtp_schedule(self) -> list[tuple[float, float]]:
        return parse_piecewise(self.mtp_weight, "mtp_weight")

    @property
    def gamma_schedule(self) -> list[tuple[float, float]]:
        return parse_piecewise(self.bias_update_speed, "bias_update_speed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.run import run_config

    cfg = run_config(PretrainConfig, args)   # resumed: the saved config, overridden by the YAML file and flags
    try:
        pretrain(cfg)
    except NanoseekError:
        if int(os.environ.get("RANK", "0")) != 0:
            return 2        # under torchrun every rank fails alike; rank 0 alone prints the one line
        raise
    return 0


def pretrain(cfg: PretrainConfig) -> dict:
    """Train as `cfg` says; returns {"step", "loss", "run_dir"} (rank 0 has the final loss)."""
    import torch
    from tqdm import tqdm

    from nanoseek import scratch
    from nanoseek.accounting import count_params, flops_per_token
    from nanoseek.checkpoint.native import export_hf, gather_state
    from nanoseek.data.pretrain import PretrainLoader, expand_paths, synthetic_corpus
    from nanoseek.parallel import distributed as D
    from nanoseek.parallel import grad_sync, parallelize
    from nanoseek.parallel.wrap import check_options
    from nanoseek.train import run as R
    from nanoseek.train.balance import LoadBalancer
    from nanoseek.train.loop import (Throughput, autocast, matmul_peak_flops, resolve_precision, seed_all,
                                     tune_allocator)
    from nanoseek.train.losses import lm_loss, target_counts
    from nanoseek.train.metrics import MetricsLog, plot_curves, read_metrics
    from nanoseek.train.optim import build_optimizer, clipped_step, set_lr
    from nanoseek.train.schedules import lr_at, piecewise_at

    # ------------------------------------------------------------------ setup: checks first, before any work
    dist = D.init_distributed(cfg.device)
    check_options(dist, fsdp=cfg.fsdp, fp8=cfg.fp8)
    run_dir = Path(cfg.out)
    micro = cfg.micro_batch_size or max(cfg.batch_size // dist.world_size, 1)
    if cfg.batch_size % (dist.world_size * micro):
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of processes x micro_batch_size "
                          f"({dist.world_size} x {micro} = {dist.world_size * micro})")
    cfg.micro_batch_size = micro          # saved resolved: a resume keeps the same data streams
    files = expand_paths(cfg.data) if cfg.data else None                      # DataError on a missing path
    resume_from = R.find_resume_point(run_dir, cfg.resume)
    precision = resolve_precision(cfg.precision, dist.device, warn=dist.is_main)
    seed_all(cfg.seed)
    tune_allocator()                    # keep freed activation blocks in the process (glibc; see loop.py)

    # ------------------------------------------------------------------ tokenizer and model
    base_cfg, ckpt_dir = R.resolve_model(cfg.model)
    tokenizer = _tokenizer(cfg, base_cfg, ckpt_dir, run_dir, files, dist)
    if ckpt_dir is not None:
        import nanoseek

        model = nanoseek.load_model(ckpt_dir, device=dist.device).train()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but {ckpt_dir} embeds only "
                              f"{model.config.vocab_size}; use the checkpoint's tokenizer")
    else:
        from nanoseek.model import build_model

        model = build_model(base_cfg.replace(vocab_size=tokenizer.vocab_size), seed=cfg.seed, device=dist.device)
    mcfg = model.config
    depth = len(model.mtp)
    R.write_run_files(run_dir, cfg.to_dict(), mcfg, dist, precision=precision,
                      resumed_from=str(resume_from) if resume_from else None)

    # ------------------------------------------------------------------ data: B / micro streams, A per rank
    n_streams = cfg.batch_size // micro
    per_rank = n_streams // dist.world_size
    texts = None if files else synthetic_corpus(CORPUS_DOCS, seed=0)
    loaders = {s: PretrainLoader(tokenizer, files, texts=texts, batch_size=micro, seq_len=cfg.seq_len, rank=s,
                                 world_size=n_streams, field=cfg.data_field)
               for s in range(dist.rank * per_rank, (dist.rank + 1) * per_rank)}

    # ------------------------------------------------------------------ wrap, optimizer, balancing, resume
    train_model = parallelize(model, dist, fsdp=cfg.fsdp, compile=cfg.compile,
                              activation_checkpointing=cfg.activation_checkpointing, fp8=cfg.fp8)
    optimizer = build_optimizer(train_model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    balancer = LoadBalancer(model)
    start = 0
    if resume_from is not None:
        start = R.load_training_checkpoint(resume_from, train_model, optimizer, dist, loaders=loaders,
                                           model_config=mcfg)["step"]
    metrics = MetricsLog(run_dir, enabled=dist.is_main, resume_step=start if resume_from else None)

    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops = flops_per_token(mcfg, cfg.seq_len, training=True, mtp=depth > 0).total
    peak = matmul_peak_flops(dist.device, torch.bfloat16 if precision == "bf16" else torch.float32)
    meter = Throughput(flops, peak * dist.world_size)
    if dist.is_main:
        pc = count_params(mcfg)
        print(f"pretrain: {pc.total / 1e6:.2f}M params ({pc.activated / 1e6:.2f}M activated, MTP depth {depth}), "
              f"{cfg.batch_size} x {cfg.seq_len} tokens/step in {n_streams} streams of {micro}, "
              f"{dist.world_size} process(es){' FSDP2' if cfg.fsdp else ' DDP' if dist.distributed else ''} on "
              f"{dist.device}, {precision}, peak {peak / 1e9:.0f} GFLOP/s per process; steps {start} -> {cfg.steps}",
              flush=True)

    last_plot = [0.0]

    def save(step: int, final: bool = False) -> dict | None:
        state = R.save_training_checkpoint(run_dir, step, train_model, optimizer, dist, loaders=loaders,
                                           keep_last=cfg.keep_last, config=cfg.to_dict(), model_config=mcfg.to_hf())
        if dist.is_main and (final or time.monotonic() - last_plot[0] > PLOT_EVERY_S):
            records = read_metrics(run_dir)
            plot_curves(records, ["loss", "ce", "mtp"], run_dir / "loss.png", "training loss", "loss")
            plot_curves(records, ["load_ratio"], run_dir / "expert_load.png",
                        "expert load per MoE layer (max / min tokens)", "max/min load", logy=True)
            last_plot[0] = time.monotonic()
        return state

    # ------------------------------------------------------------------ the loop
    bar = tqdm(total=cfg.steps, initial=start, disable=not (dist.is_main and cfg.progress), unit="step",
               dynamic_ncols=True)
    loss = float("nan")
    state = None
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio, cfg.decay_frac)
        lam = piecewise_at(cfg.mtp_schedule, step, cfg.steps)
        gamma = piecewise_at(cfg.gamma_schedule, step, cfg.steps)
        set_lr(optimizer, lr)

        batches = [next(loader) for loader in loaders.values()]                  # this rank's micro-batches
        # Target counts of the whole step (all micro-batches, all ranks): each micro-batch's loss is its sum of
        # token losses over these, so the pieces add up to exactly the step's mean loss.
        counts = D.all_reduce_sum(sum(target_counts(b.target_mask, depth) for b in batches)).tolist()
        parts = torch.zeros(4, dtype=torch.float64, device=dist.device)           # loss, ce, mtp, balance
        for i, b in enumerate(batches):
            inputs, targets, mask = (t.to(dist.device) for t in (b.inputs, b.targets, b.target_mask))
            with grad_sync(train_model, sync=i == len(batches) - 1):
                with autocast(dist.device, precision):
                    # the head's inputs (B,T,H), D x (B,T,H): lm_head is fused into the loss chunk by chunk.
                    # Its weight is read after the forward: under FSDP2 the root's parameters stay unsharded
                    # from its forward to its backward.
                    out = train_model(inputs, return_mtp=depth > 0, compute_logits=False)
                    total, ce, mtp = lm_loss(out.hidden, out.mtp_hidden, targets, mask, lam, counts,
                                             head_weight=model.lm_head.weight)
                    bal = balancer.collect(mask, cfg.balance_alpha, normalizer=cfg.batch_size)
                    total = total + bal
                # DDP and FSDP2 average gradients over ranks; our losses are already global means, so undo it.
                (total * dist.world_size).backward()
            parts += torch.stack([total.detach(), ce.detach(), mtp.detach(), bal.detach()]).double()
        grad_norm = clipped_step(optimizer, train_model.parameters(), cfg.grad_clip)
        optimizer.zero_grad(set_to_none=True)
        load = balancer.step(gamma, D.all_reduce_sum)                             # bias update, every rank alike
        loss, ce, mtp, bal = D.all_reduce_sum(parts).tolist()

        seconds = time.perf_counter() - t0
        tps, mfu = meter.update(tokens_per_step, seconds)
        metrics.log({"step": step + 1, "loss": loss, "ce": ce, "mtp": mtp, "balance": bal, "lr": lr,
                     "mtp_weight": lam, "bias_update_speed": gamma, "grad_norm": grad_norm,
                     "tokens": (step + 1) * tokens_per_step, "tokens_per_s": tps, "mfu": mfu,
                     "step_time": seconds, **load})
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.3f} (ce {ce:.3f}) | {meter.ema:,.0f} tok/s | MFU {mfu:.1%} | "
                            f"load max/min {max(load['load_ratio'], default=1):.1f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            state = save(step + 1, final=step + 1 == cfg.steps)
    bar.close()
    metrics.close()
    scratch.release()                   # the loop's per-thread temporaries

    # ------------------------------------------------------------------ save: the final model in HF format
    if start >= cfg.steps:              # no step ran (resumed at --steps): export the checkpoint as it is
        state = gather_state(train_model, optimizer)[0]           # a collective: every rank takes part
    last = max(start, cfg.steps)
    if dist.is_main:
        export_hf(mcfg, state, run_dir / "final", tokenizer)
        done = f"loss {loss:.4f}" if start < cfg.steps else "nothing left to train"
        print(f"pretrain: step {last}, {done}; model in {run_dir / 'final'}", flush=True)
    D.barrier()
    D.shutdown()
    return {"step": last, "loss": loss, "run_dir": str(run_dir)}


def _tokenizer(cfg: PretrainConfig, model_cfg, ckpt_dir, run_dir: Path, files, dist):
    """The run's tokenizer, kept in RUN/tokenizer: --tokenizer, else the checkpoint's, else the one a previous
    launch of this run trained, else a new byte-level BPE of the model's vocab_size trained (by rank 0) on the
    data or the generated corpus."""
    from nanoseek.data.pretrain import synthetic_corpus
    from nanoseek.parallel.distributed import barrier
    from nanoseek.tokenizer import Tokenizer, train_tokenizer

    cached = run_dir / "tokenizer"
    source = Path(cfg.tokenizer) if cfg.tokenizer else ckpt_dir
    if source is not None:
        tok = Tokenizer.from_dir(source)
        if dist.is_main:
            tok.save(cached)
        return tok
    if dist.is_main and not (cached / "tokenizer.json").is_file():
        texts = None if files else synthetic_corpus(CORPUS_DOCS, seed=0)
        train_tokenizer(files, vocab_size=model_cfg.vocab_size, out_dir=cached, texts=texts, show_progress=False,
                        field=cfg.data_field)
    barrier()
    return Tokenizer.from_dir(cached)
