"""The evaluation loop: problems -> k sampled completions each -> extracted answers -> verifier scores -> metrics.

    from nanoseek.eval import evaluate
    items = get_task("countdown").generate(n=300, seed=1, difficulty=1)
    res = evaluate("runs/demo/final", items, k=1)            # a checkpoint dir, an LLM, or a model + tokenizer
    res = evaluate(Endpoint("http://127.0.0.1:8000/v1"), items, k=4, temperature=0.6, top_p=0.95)
    res["pass_at_1"], res["maj_at_k"], res["pass_at_k"]

Each problem is one user message rendered with the checkpoint's chat template and R1's generation prompt
(`<｜Assistant｜><think>\\n`); for an endpoint the server renders its own template (/v1/chat/completions). Problem
i is sampled with seed `request_seed(seed, i)` and n=k, and the engine draws completion j from a generator fixed
by (request seed, j), so a run is a function of its arguments whatever the batching. Answers are extracted and
verified by the task (nanoseek.data.tasks), the same code the RL rewards use.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from nanoseek.data.tasks import TaskItem, extract_answer, get_task
from nanoseek.errors import ConfigError, NanoseekError
from nanoseek.eval.metrics import aggregate

# A backend takes one chat conversation per problem, the sampling options (k, temperature, top_p,
# max_new_tokens, seed) and a progress callback (or None; called with the number of problems done), and returns,
# per problem, k (completion text, completion token count) pairs.
Sample = tuple[str, int]
Backend = Callable[[list[list[dict]], dict, Callable[[int], object] | None], list[list[Sample]]]


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of problem `index`: distinct per problem and run seed, stable across processes."""
    return (seed * 1_000_003 + index) % 2 ** 31


def messages_for(item: TaskItem, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": item.question}]


# ----------------------------------------------------------------------------- local engine
class LocalBackend:
    """Problems through nanoseek's engine in one process; prompts go in chunks so a progress bar can move
    while the engine still batches many sequences at once."""

    def __init__(self, llm, chunk_sequences: int = 256):
        if llm.tokenizer is None:
            raise ConfigError("eval renders prompts with the chat template: the checkpoint needs a tokenizer.json")
        self.llm = llm
        self.chunk_sequences = chunk_sequences

    def __call__(self, conversations, opts, progress=None):
        from nanoseek.inference import SamplingParams

        k = opts["k"]
        step = max(1, self.chunk_sequences // k)
        out: list[list[Sample]] = []
        for start in range(0, len(conversations), step):
            convs = conversations[start:start + step]
            prompts = [self.llm.render_chat(m) for m in convs]
            params = [SamplingParams(n=k, temperature=opts["temperature"], top_p=opts["top_p"],
                                     max_tokens=opts["max_new_tokens"], seed=request_seed(opts["seed"], start + i))
                      for i in range(len(convs))]
            for res in self.llm.generate(prompts, params):
                out.append([(c.text, len(c.token_ids)) for c in sorted(res.outputs, key=lambda c: c.index)])
            if progress is not None:
                progress(len(convs))
        return out


# ----------------------------------------------------------------------------- OpenAI-compatible endpoint
@dataclass
class Endpoint:
    """An OpenAI-compatible server (`nanoseek serve`, vLLM, SGLang, ...), spoken to with the standard library.

    url: the API base ("http://host:8000/v1"; "/v1" is added when missing) or the full chat completions URL.
    served_model: the model id to send; None asks /v1/models and takes the first."""
    url: str
    api_key: str | None = None
    served_model: str | None = None
    concurrency: int = 8          # requests in flight: the server batches them together
    timeout_s: float = 600.0

    def __post_init__(self):
        base = self.url.rstrip("/")
        if urllib.parse.urlparse(base).scheme not in ("http", "https"):
            raise ConfigError(f"endpoint {self.url!r}: expected an http(s):// URL, e.g. http://127.0.0.1:8000/v1")
        if base.endswith("/chat/completions"):
            base = base[: -len("/chat/completions")]
        self.base = base if base.endswith("/v1") else base + "/v1"
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")

    def _request(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers,
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise NanoseekError(f"{self.base}{path}: HTTP {e.code}: {str(detail)[:300]}") from None
        except urllib.error.URLError as e:
            raise NanoseekError(f"{self.base}{path}: cannot connect ({e.reason}); is the server running?") from None

    def model_id(self) -> str:
        if self.served_model is None:
            models = self._request("/models").get("data") or []
            if not models:
                raise NanoseekError(f"{self.base}/models lists no model: pass --served-model NAME")
            self.served_model = models[0]["id"]
        return self.served_model

    def __call__(self, conversations, opts, progress=None):
        model = self.model_id()

        def one(i: int) -> list[Sample]:
            body = {"model": model, "messages": conversations[i], "n": opts["k"], "seed": request_seed(opts["seed"], i),
                    "temperature": opts["temperature"], "top_p": opts["top_p"], "max_tokens": opts["max_new_tokens"]}
            resp = self._request("/chat/completions", body)
            choices = sorted(resp["choices"], key=lambda c: c["index"])
            if len(choices) != opts["k"]:
                raise NanoseekError(f"{self.base}: asked for n={opts['k']} choices, got {len(choices)}")
            # the server does not split usage per choice: share the completion tokens out evenly
            n_tok = (resp.get("usage") or {}).get("completion_tokens", 0) // len(choices)
            if progress is not None:
                progress(1)
            return [(completion_text(c["message"]), n_tok) for c in choices]

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, range(len(conversations))))


def completion_text(message: dict) -> str:
    """Rebuild the raw completion from a chat message that a reasoning parser split.

    With R1's template the prompt opens `<think>`, so the raw completion is `REASONING</think>ANSWER`; servers
    return REASONING as `reasoning_content` (vLLM, nanoseek; `reasoning` in newer ones) and ANSWER as `content`.
    An empty content means the think block never closed: the raw text is the reasoning alone, as the local
    engine would return it."""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    content = message.get("content") or ""
    if reasoning is None:
        return content
    return f"{reasoning}</think>{content}" if content else reasoning


# ----------------------------------------------------------------------------- the loop
def as_backend(target, tokenizer=None, **engine_options) -> Backend:
    """A checkpoint dir, an LLM, a model (+ tokenizer), an Endpoint or any backend callable -> a backend."""
    if callable(target) and not hasattr(target, "forward"):     # an Endpoint or a backend (a model is callable too)
        return target
    from nanoseek.inference import LLM

    if isinstance(target, (str, Path)) or hasattr(target, "forward"):
        target = LLM(target, tokenizer=tokenizer, **engine_options)
    return LocalBackend(target)


def evaluate(target, items: Sequence[TaskItem], k: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int = 0, system: str | None = None, tokenizer=None,
             progress: bool = False, return_samples: bool = False, **engine_options) -> dict:
    """Sample k completions per problem from `target` and score them (see the module docstring).

    target: a checkpoint dir, a nanoseek.LLM, a DeepseekForCausalLM with `tokenizer`, an Endpoint, or a backend
    callable (conversations, opts, progress) -> [[(text, n_tokens)] * k]. Returns pass_at_1, maj_at_k, pass_at_k,
    answered, n, k, task, seed and the sampling settings; with return_samples, also `samples`: per problem the
    completions, extracted answers and scores."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not items:
        raise ConfigError("no problems to evaluate")
    backend = as_backend(target, tokenizer, **engine_options)
    opts = dict(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    conversations = [messages_for(it, system) for it in items]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="eval", unit="problem")
    t0 = time.perf_counter()
    try:
        outs = backend(conversations, opts, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    gen_s = time.perf_counter() - t0

    scores, answers, samples = [], [], []
    for item, completions in zip(items, outs):
        task = get_task(item.task)
        ans = [extract_answer(text, task.answer_kind) for text, _ in completions]
        row = [0.0 if a is None else float(task.verify(a, item)) for a in ans]
        scores.append(row)
        answers.append(ans)
        if return_samples:
            samples.append({"question": item.question, "reference": item.answer, "task": item.task,
                            "completions": [t for t, _ in completions], "answers": ans, "scores": row})
    n_tokens = sum(n for comps in outs for _, n in comps)
    result = {"task": ",".join(dict.fromkeys(it.task for it in items)), "n": len(items), "k": k, "seed": seed,
              **aggregate(scores, answers, k),
              "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
              "mean_response_tokens": n_tokens / (len(items) * k),
              "wall_seconds": round(time.perf_counter() - t0, 3),
              "completion_tokens_per_s": n_tokens / gen_s if gen_s > 0 else 0.0}
    if return_samples:
        result["samples"] = samples
    return result
