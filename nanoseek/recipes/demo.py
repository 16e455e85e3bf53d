"""`nanoseek demo`: the whole recipe in one command, from nothing to a measurably better reasoner on a CPU.

    nanoseek demo --out runs/demo --seed 0          # ~minutes on 2 CPU cores
    nanoseek demo --out /tmp/q --quick              # a tiny end-to-end run (tests)

Stages, each one the recipes' own Python API:
  1. corpus: problems of the task (arithmetic, difficulty 1) rendered in the exact R1 chat format the eval uses
     (prompt ... `<｜Assistant｜><think>\\n`, completion `EXPR = V\\n</think>\\n<answer>N</answer>` + EOS): the
     worked value V in the think block is always right, but the written answer N is V only `correct_frac` of
     the time and otherwise a near miss (V + 1); mixed with plain-text arithmetic facts (`EXPR = V.`) and the
     generated stories corpus. The base model thus learns the skill *and* a bad habit;
  2. tokenizer: a byte-level BPE trained on that corpus (nanoseek.tokenizer.train_tokenizer);
  3. pretrain: a small V3-architecture model (MLA + MoE + MTP) with nanoseek.recipes.pretrain.pretrain;
  4. eval before: nanoseek.eval.evaluate on held-out problems (get_task(task).generate(n_eval, seed, difficulty),
     greedy, k=1, the eval defaults), so `nanoseek eval --model DIR/CKPT --task T --n N --seed S` reproduces it;
  5. GRPO (nanoseek.recipes.grpo.grpo) on held-in problems with the accuracy reward: RL elicits the answer the
     model already samples part of the time;
  6. eval after, then DIR/report.md (with the run dirs' plots) and DIR/report.json.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

HELP = "the whole recipe in one command: tokenizer, pretrain (MLA+MoE+MTP), GRPO, eval before/after, a report"
TASK = "arithmetic"
DIFFICULTY = 1          # the eval CLI's default difficulty, so `nanoseek eval` reproduces the report


@dataclass
class DemoSettings:
    """Sizes of one demo run (the default: the full demo; quick(): the tiny one the tests run)."""
    n_problems: int = 12000          # chat-format problems in the pretraining corpus
    n_plain: int = 1000             # plain-text documents mixed in (nanoseek.data.pretrain.synthetic_corpus)
    correct_frac: float = 0.4      # fraction of corpus answers that are right; the rest are off by one
    vocab_size: int = 640
    model: dict = field(default_factory=lambda: dict(
        hidden_size=96, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, num_nextn_predict_layers=1,
        max_position_embeddings=512, rope_scaling=None))
    pretrain_steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    pretrain_lr: float = 3e-3
    grpo_steps: int = 100
    group_size: int = 8
    prompts_per_step: int = 16          # 8 left the lift at the mercy of noise: +17 and +45 points on two seeds
    grpo_lr: float = 1e-4                # 3e-4 was on the edge: seed 2 gained nothing with it, 1e-3 collapsed
    grpo_max_new_tokens: int = 32
    n_eval: int = 300

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(n_problems=600, n_plain=50, vocab_size=400, pretrain_steps=6, batch_size=4, seq_len=128,
                   grpo_steps=2, group_size=4, prompts_per_step=2, grpo_max_new_tokens=16, n_eval=16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output dir: report.md, report.json, run dirs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, model, RL and held-out problems")
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end run (seconds; for tests)")
    parser.add_argument("--n-eval", type=int, default=None, help="held-out problems (default: 300; quick: 16)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.n_eval is not None:
        settings.n_eval = args.n_eval
    report = demo(args.out, seed=args.seed, settings=settings, progress=args.progress)
    print(f"demo: pass@1 {100 * report['pass_at_1_before']:.1f}% -> {100 * report['pass_at_1_after']:.1f}% on "
          f"{report['n_eval']} held-out {report['task']} problems in {report['wall_seconds']:.0f} s; "
          f"report in {Path(args.out) / 'report.md'}")
    return 0


def render_doc(tokenizer_like_text: str, item, answer: str) -> str:
    """One pretraining document: the eval's rendered prompt (without BOS; the loader adds it) + a completion."""
    expr = item.meta.get("expression", "").strip()
    return f"{tokenizer_like_text}{expr} = {item.answer}\n</think>\n<answer>{answer}</answer>"


def build_corpus(seed: int, s: DemoSettings) -> list[str]:
    from nanoseek.chat import R1_CHAT_TEMPLATE, compile_template
    from nanoseek.data.pretrain import synthetic_corpus
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import BOS

    template = compile_template(R1_CHAT_TEMPLATE)
    rng = random.Random(seed)
    items = get_task(TASK).generate(s.n_problems, seed=10_000 + seed, difficulty=DIFFICULTY)
    docs = []
    for it in items:
        prompt = template.render(messages=[{"role": "user", "content": it.question}], add_generation_prompt=True,
                                 bos_token=BOS, eos_token="", pad_token="", unk_token=None)
        prompt = prompt[len(BOS):] if prompt.startswith(BOS) else prompt
        value = int(it.answer)
        answer = value if rng.random() < s.correct_frac else value + 1
        docs.append(render_doc(prompt, it, str(answer)))
    # plain-text arithmetic facts, always right: the skill the chat-format habit hides
    facts = get_task(TASK).generate(s.n_problems, seed=20_000 + seed, difficulty=DIFFICULTY)
    docs += [f"{it.meta['expression']} = {it.answer}." for it in facts]
    docs += synthetic_corpus(s.n_plain, seed=seed)
    rng.shuffle(docs)
    return docs


def demo(out: str | Path, seed: int = 0, settings: DemoSettings | None = None, progress: bool = True) -> dict:
    """Run the whole demo into `out`; returns the report (also written to out/report.json)."""
    from nanoseek.config import ModelConfig
    from nanoseek.data.tasks import get_task
    from nanoseek.eval.run import evaluate
    from nanoseek.recipes.grpo import GRPOConfig, grpo
    from nanoseek.recipes.pretrain import PretrainConfig, pretrain
    from nanoseek.tokenizer import train_tokenizer

    s = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("pretrain", "grpo"):            # a demo run starts fresh (no resume of an older run's steps)
        shutil.rmtree(out / sub, ignore_errors=True)
    t0 = time.perf_counter()
    timings = {}

    def stage(name: str, t: float) -> None:
        timings[name] = round(time.perf_counter() - t, 2)
        print(f"demo: {name} done in {timings[name]:.1f} s", flush=True)

    # 1-2. corpus and tokenizer
    t = time.perf_counter()
    docs = build_corpus(seed, s)
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    with open(data_dir / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tok = train_tokenizer(vocab_size=s.vocab_size, out_dir=out / "tokenizer", texts=docs, show_progress=progress)
    mcfg = ModelConfig.from_name("tiny").replace(vocab_size=tok.vocab_size, **s.model)
    (data_dir / "model.json").write_text(json.dumps(mcfg.to_hf(), indent=1))
    stage("corpus+tokenizer", t)

    # 3. pretrain
    t = time.perf_counter()
    pcfg = PretrainConfig(model=str(data_dir / "model.json"), data=[str(data_dir / "corpus.jsonl")],
                          tokenizer=str(out / "tokenizer"), out=str(out / "pretrain"), steps=s.pretrain_steps,
                          save_every=0, keep_last=1, seed=seed, batch_size=s.batch_size, seq_len=s.seq_len,
                          lr=s.pretrain_lr, warmup_steps=max(1, s.pretrain_steps // 20), device="cpu",
                          progress=progress)
    pcfg.validate()
    pre = pretrain(pcfg)
    stage("pretrain", t)

    # 4. eval before, exactly as `nanoseek eval --model CKPT --task T --n N --seed S`
    items = get_task(TASK).generate(s.n_eval, seed=seed, difficulty=DIFFICULTY)
    engine = {"dtype": "float32", "device": None}
    t = time.perf_counter()
    before = evaluate(str(out / "pretrain" / "final"), items, seed=seed, progress=progress, **engine)
    stage("eval before", t)

    # 5. GRPO on held-in problems (the recipe draws them with its own seeds)
    t = time.perf_counter()
    gcfg = GRPOConfig(model=str(out / "pretrain" / "final"), out=str(out / "grpo"), steps=s.grpo_steps,
                      save_every=0, keep_last=1, seed=seed, task=TASK, difficulty=DIFFICULTY,
                      group_size=s.group_size, prompts_per_step=s.prompts_per_step, lr=s.grpo_lr,
                      max_new_tokens=s.grpo_max_new_tokens, seq_len=s.seq_len, device="cpu", progress=progress)
    gcfg.validate()
    rl = grpo(gcfg, reward_fns={"accuracy": 1.0, "format_strict": 0.1})
    stage("grpo", t)

    # 6. eval after, the report
    t = time.perf_counter()
    after = evaluate(str(out / "grpo" / "final"), items, seed=seed, progress=progress, **engine)
    stage("eval after", t)
    wall = round(time.perf_counter() - t0, 1)

    plots = {}
    for name, src in (("loss", out / "pretrain" / "loss.png"), ("reward", out / "grpo" / "reward.png"),
                      ("response_length", out / "grpo" / "length.png"), ("expert_load", out / "pretrain" /
                                                                          "expert_load.png")):
        if src.is_file():
            plots[name] = str(src.relative_to(out))
    acc_png = _accuracy_plot(out, before["pass_at_1"], after["pass_at_1"])
    if acc_png:
        plots["accuracy"] = acc_png
    report = {"task": TASK, "difficulty": DIFFICULTY, "seed": seed, "quick": s.pretrain_steps < 50,
              "n_eval": len(items), "pass_at_1_before": before["pass_at_1"], "pass_at_1_after": after["pass_at_1"],
              "lift_points": round(100 * (after["pass_at_1"] - before["pass_at_1"]), 2),
              "answered_before": before["answered"], "answered_after": after["answered"],
              "mean_response_tokens_before": before["mean_response_tokens"],
              "mean_response_tokens_after": after["mean_response_tokens"],
              "wall_seconds": wall, "stage_seconds": timings,
              "checkpoint_before": "pretrain/final", "checkpoint_after": "grpo/final",
              "pretrain_final_loss": pre["loss"], "grpo_final_reward": rl["reward"],
              "eval_command": f"nanoseek eval --model {out}/grpo/final --task {TASK} --n {len(items)} "
                              f"--seed {seed} --json",
              "settings": {k: v for k, v in vars(s).items()}, "plots": plots}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
    return report


def _accuracy_plot(out: Path, before: float, after: float) -> str | None:
    """GRPO training accuracy per step with the held-out pass@1 before/after as horizontal lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from nanoseek.train.metrics import read_metrics
    except ImportError:
        return None
    recs = [r for r in read_metrics(out / "grpo") if "accuracy" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if recs:
        ax.plot([r["step"] for r in recs], [r["accuracy"] for r in recs], label="GRPO rollout accuracy (held-in)")
    ax.axhline(before, color="gray", ls="--", label=f"held-out pass@1 before RL ({before:.1%})")
    ax.axhline(after, color="green", ls="--", label=f"held-out pass@1 after RL ({after:.1%})")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("accuracy")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
    return "accuracy.png"


def _markdown(r: dict) -> str:
    lines = [f"# nanoseek demo (seed {r['seed']})", "",
             f"Task `{r['task']}` (difficulty {r['difficulty']}), {r['n_eval']} held-out problems, greedy pass@1:", "",
             "| model | pass@1 | answered | mean response tokens |", "|---|---|---|---|",
             f"| pretrained (`{r['checkpoint_before']}`) | {100 * r['pass_at_1_before']:.1f}% | "
             f"{100 * r['answered_before']:.1f}% | {r['mean_response_tokens_before']:.1f} |",
             f"| after GRPO (`{r['checkpoint_after']}`) | {100 * r['pass_at_1_after']:.1f}% | "
             f"{100 * r['answered_after']:.1f}% | {r['mean_response_tokens_after']:.1f} |", "",
             f"Lift: {r['lift_points']:+.1f} points. Wall time {r['wall_seconds']:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in r['stage_seconds'].items())}).", "",
             f"Reproduce: `{r['eval_command']}`", "",
             "The pretraining corpus renders the task in the eval's chat format: the worked value in the think "
             "block is always right, but the final answer copies it only "
             f"{100 * r['settings']['correct_frac']:.0f}% of the time (otherwise it is off by one). The base "
             "model samples the right answer sometimes but prefers the wrong one; GRPO with the accuracy reward "
             "turns that partly learned skill into the greedy answer. Held-out problems are a fresh draw of the "
             "task (seed = the demo seed); at difficulty 1 the problem space is small (a few thousand distinct "
             "questions), so held-out questions can also occur in the corpus and in RL prompts.", ""]
    for name, path in r["plots"].items():
        lines += [f"## {name}", "", f"![{name}]({path})", ""]
    return "\n".join(lines)
