"""What the benchmarks share: the ~18M-parameter MoE config, the machine's measured matmul peak, and a
transformers twin of that config whose weights reach nanoseek through the real converter."""
from __future__ import annotations

import contextlib
import statistics
import tempfile

import torch

import nanoseek


def bench_config(vocab: int = 8192) -> nanoseek.ModelConfig:
    """hidden 256, 8 layers (1 dense), 16 routed experts top-4 in 4 groups (top-2 groups), kv_lora 64, q_lora 128."""
    return nanoseek.ModelConfig.from_name(
        "small", vocab_size=vocab, hidden_size=256, num_hidden_layers=8, first_k_dense_replace=1,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, kv_lora_rank=64, q_lora_rank=128,
        num_nextn_predict_layers=0)


@contextlib.contextmanager
def hf_twin(cfg: nanoseek.ModelConfig, seed: int = 0):
    """Yield (transformers DeepseekV3ForCausalLM, its HF-format dir): load the dir with nanoseek to get the same
    weights on both sides."""
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_hf()))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        yield hf, d


def next_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
    """Mean next-token CE the way each library trains: nanoseek's hidden states into its fused head + loss (as its
    pretrain recipe does), transformers' logits into the same CE (fp32 log-softmax, what its `labels=` loss runs)."""
    from nanoseek.train.losses import cross_entropy

    if isinstance(model, nanoseek.DeepseekForCausalLM):
        hidden = model(inputs, compute_logits=False).hidden                                  # (B,T,H)
        return cross_entropy(hidden, targets, mask, head_weight=model.lm_head.weight)
    return cross_entropy(model(inputs).logits, targets, mask)                                # (B,T,V) logits


def pair_ratios(ours: list[float], theirs: list[float]) -> str:
    """The per-step ratios theirs[i] / ours[i] (both sides timed on the same batch, back to back) as
    "q1 median q3". Their median is the speedup with the host's drift paired out (the ratio of the two medians
    takes its steps from different moments of a host whose speed wanders); the quartiles show how far the noise
    moves it within the run."""
    q = statistics.quantiles([t / o for o, t in zip(ours, theirs)], n=4)
    return f"{q[0]:.2f} {q[1]:.2f} {q[2]:.2f}"


def add_run_arguments(parser) -> None:
    """--warmup, --threads and --precision both|fp32|bf16, shared by bench_model and bench_train."""
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (oneDNN builds a kernel per new "
                        "bf16 matmul shape: more warm-up measures the steady state)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--precision", choices=["both", "fp32", "bf16"], default="both",
                        help="which precisions to run (bf16 autocast crawls on CPUs without hardware bf16 matmuls)")


def twin_models(args):
    """Apply --threads, then (config, transformers model, nanoseek model) with the same weights, the nanoseek side
    loaded from the transformers one's save through the real converter."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_config(args.vocab)
    with hf_twin(cfg) as (hf, d):
        ours = nanoseek.load_model(d)
    return cfg, hf, ours
