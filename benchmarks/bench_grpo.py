"""nanoseek grpo vs TRL's GRPOTrainer: the same model (exported to HF format), task, reward, group size, batch,
completion length and learning rate, in one run. Prints completions/s and seconds per step for both, and the ratio.

    pip install trl          # benchmark only; nanoseek never imports it
    python benchmarks/bench_grpo.py [--model tiny] [--steps 6] [--group-size 8] [--prompts-per-step 4]
                                    [--max-new-tokens 32] [--compile-rollouts]

Completions/s counts every completion of a step over the whole step's wall time (generation + scoring +
update), measured after one warm-up step. Both sample at temperature 1 with no EOS early exit forced
(`min` / `max` new tokens equal would change the task; a fresh model rarely emits EOS, so lengths match).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def digits(text: str, item=None) -> float:
    """The reward both trainers use: share of non-space characters that are digits."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / max(len(chars), 1)


def export(model_name: str, root: Path) -> Path:
    """A fresh nanoseek model + byte-level BPE tokenizer in HF format (what both sides load)."""
    import nanoseek
    from nanoseek.config import ModelConfig
    from nanoseek.data.pretrain import synthetic_corpus
    from nanoseek.model import build_model
    from nanoseek.tokenizer import train_tokenizer

    cfg = ModelConfig.from_name(model_name)
    tok = train_tokenizer(texts=synthetic_corpus(2000, seed=0), vocab_size=cfg.vocab_size, show_progress=False)
    model = build_model(cfg.replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=0), seed=0)
    out = root / "model"
    nanoseek.save_model(model, out)
    tok.save(out)
    return out


def bench_nanoseek(model_dir: Path, args, root: Path) -> dict:
    from nanoseek.recipes.grpo import GRPOConfig, grpo
    from nanoseek.train.metrics import read_metrics

    cfg = GRPOConfig(model=str(model_dir), out=str(root / "nanoseek"), steps=args.steps + 1, save_every=0,
                     lr=args.lr, group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                     max_new_tokens=args.max_new_tokens, seq_len=512, progress=False, device="cpu",
                     precision="fp32", compile_rollouts=args.compile_rollouts)
    grpo(cfg, reward_fns={digits: 1.0})
    recs = read_metrics(cfg.out)[1:]                               # drop the warm-up step
    step = sum(r["step_time"] for r in recs) / len(recs)
    return {"step_s": step, "completions_per_s": args.group_size * args.prompts_per_step / step,
            "rollout_completions_per_s": sum(r["completions_per_s"] for r in recs) / len(recs),
            "reward_last": recs[-1]["reward"]}


def bench_trl(model_dir: Path, args, root: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.data.tasks import get_task

    n = args.prompts_per_step * (args.steps + 1)
    items = get_task("arithmetic").generate(n, seed=0)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": it.question}]} for it in items])

    def reward(prompts, completions, **kw):
        return [digits(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.group_size * args.prompts_per_step,
                     num_generations=args.group_size, max_completion_length=args.max_new_tokens,
                     max_steps=args.steps + 1, learning_rate=args.lr, beta=0.0, temperature=1.0, logging_steps=1,
                     report_to="none", use_cpu=True, save_strategy="no", lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[timer])
    trainer.train()
    times = timer.times[1:]
    step = sum(times) / len(times)
    return {"step_s": step, "completions_per_s": args.group_size * args.prompts_per_step / step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="nanoseek preset exported to HF format for both sides")
    p.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length cap")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (both)")
    p.add_argument("--compile-rollouts", action="store_true",
                   help="nanoseek: torch.compile the rollout engine (compiled before the first step, not timed)")
    args = p.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    try:
        model_dir = export(args.model, root)
        ns = bench_nanoseek(model_dir, args, root)
        trl = bench_trl(model_dir, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"model {args.model}, G={args.group_size}, P={args.prompts_per_step}, max_new_tokens={args.max_new_tokens}, "
          f"{args.steps} timed steps, compile_rollouts={args.compile_rollouts}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':10s} {'s/step':>8s} {'completions/s':>14s}")
    print(f"{'nanoseek':10s} {ns['step_s']:8.3f} {ns['completions_per_s']:14.1f}   (rollout alone: "
          f"{ns['rollout_completions_per_s']:.1f} completions/s)")
    print(f"{'TRL':10s} {trl['step_s']:8.3f} {trl['completions_per_s']:14.1f}")
    print(f"ratio nanoseek/TRL completions/s: {ns['completions_per_s'] / trl['completions_per_s']:.2f}x")


if __name__ == "__main__":
    main()
