"""`nanoseek generate PATH --prompt TEXT`: run prompts through the inference engine and print the completions.

The sampling and engine flags defined here are shared with `nanoseek chat`.
"""
from __future__ import annotations

import argparse
import json
import sys

HELP = "generate completions from a checkpoint with the inference engine (vLLM-style sampling flags)"


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most per completion")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--top-k", type=int, default=-1, help="keep the k most likely tokens (-1: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty, 1 = off")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    g.add_argument("--seed", type=int, default=None, help="per-request seed (same seed, same output)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=None, help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the EOS token")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--num-speculative-tokens", type=int, default=0,
                   help="MTP draft tokens per step (needs a checkpoint with an MTP module); 0 = off")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length; unset: the config's max_position_embeddings")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory (config.json + *.safetensors, tokenizer.json for text)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: one request each)")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="prompt as comma-separated token ids, e.g. 1,2,3 (repeatable; needs no tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap each --prompt as a user message in the chat template")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--logprobs", type=int, default=None, help="also return this many top log-probs per token")
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")
    add_sampling_arguments(p)
    add_engine_arguments(p)


def sampling_params(args: argparse.Namespace, **extra):
    from nanoseek.inference import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_id,
                          ignore_eos=args.ignore_eos, **extra)


def build_llm(args: argparse.Namespace):
    from nanoseek.inference import LLM

    options = dict(num_speculative_tokens=args.num_speculative_tokens, enable_prefix_caching=not args.no_prefix_caching,
                   compile=args.compile)
    if args.max_model_len:
        options["max_model_len"] = args.max_model_len
    return LLM(args.path, dtype=args.dtype, device=args.device, **options)


def _parse_ids(text: str) -> list[int]:
    from nanoseek.inference import RequestError

    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise RequestError(f"--prompt-ids {text!r}: give comma-separated integers, e.g. 1,2,3") from None


def run(args: argparse.Namespace) -> int:
    from nanoseek.inference import RequestError

    if not args.prompt and not args.prompt_ids:
        raise RequestError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    params = sampling_params(args, n=args.n, logprobs=args.logprobs)
    llm = build_llm(args)
    prompts: list = [_parse_ids(t) for t in args.prompt_ids]
    for text in args.prompt:
        prompts.append(llm.render_chat([{"role": "user", "content": text}]) if args.chat else text)
    outs = llm.generate(prompts, params)
    for out in outs:
        for c in out.outputs:
            if args.json:
                rec = {"prompt": out.prompt, "index": c.index, "text": c.text, "token_ids": c.token_ids,
                       "finish_reason": c.finish_reason}
                if c.logprobs is not None:
                    rec["logprobs"] = [{str(t): lp.logprob for t, lp in d.items()} for d in c.logprobs]
                print(json.dumps(rec, ensure_ascii=False))
            else:
                shown = c.text if llm.tokenizer is not None else " ".join(map(str, c.token_ids))
                print(f"--- [{out.request_id} #{c.index}, {len(c.token_ids)} tokens, {c.finish_reason}]")
                print(shown)
    if llm.acceptance_rate is not None:
        print(f"MTP draft acceptance rate: {llm.acceptance_rate:.2%}", file=sys.stderr)
    return 0
