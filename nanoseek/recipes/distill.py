"""`nanoseek distill`: R1's distillation: a teacher writes reasoning traces for a problem set, the verifier keeps
the correct, well-formed ones, and the student is fine-tuned on them.

    nanoseek distill --teacher runs/grpo/final --model runs/small/final --task arithmetic --out runs/distill
    nanoseek distill --teacher http://127.0.0.1:8000 --teacher-model nanoseek --model ...   # any OpenAI-compatible
    nanoseek distill ... --kd-weight 0.5        # + logit distillation (local teacher, shared tokenizer)

Stage 1 writes OUT/traces.jsonl (resumable, see `nanoseek sample`); stage 2 is `nanoseek sft` on it into the same
run dir (resumable, as SFT). --resume continues whichever stage was cut off. The endpoint client is urllib from
the standard library (no openai package): POST /v1/chat/completions; a `reasoning_content` field (DeepSeek's
API, nanoseek serve) is put back inside <think>...</think>.
"""
from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nanoseek.errors import ConfigError, NanoseekError
from nanoseek.recipes.sft import SFTConfig
from nanoseek.train.config import add_config_arguments, option

HELP = "distill a teacher (checkpoint or OpenAI-compatible endpoint) into a student via verified traces (+ KD)"


class TeacherError(NanoseekError):
    """The teacher endpoint refused or answered something unusable."""


@dataclass
class DistillConfig(SFTConfig):
    out: str = option("runs/distill", "run dir: traces.jsonl, metrics.jsonl, checkpoints/, final/ (HF format)")
    teacher: str = option("", "teacher: a checkpoint dir, or the base URL of an OpenAI-compatible server")
    teacher_model: str = option("default", "model name sent to the endpoint")
    api_key: str | None = option(None, "endpoint API key (default: $OPENAI_API_KEY when set)")
    task: str = option("arithmetic", "task name or a .jsonl/.json/.parquet problems file")
    difficulty: int = option(1, "task difficulty 1-5")
    n_prompts: int = option(256, "problems the teacher solves")
    num_samples: int = option(4, "teacher completions per problem")
    max_new_tokens: int = option(512, "teacher completion length cap")
    temperature: float = option(0.7, "teacher sampling temperature")
    require: str = option("accuracy,format_strict", "rewards that must all be 1 for a trace to be kept")
    kd_weight: float = option(0.0, "weight of the forward-KL logit loss (local teacher with the student's "
                                   "vocabulary only); 0: trace distillation alone")
    kd_temperature: float = option(1.0, "softmax temperature of the logit loss")
    timeout_s: float = option(120.0, "endpoint request timeout")

    def validate(self) -> None:
        if not self.teacher:
            raise ConfigError("distill needs --teacher (a checkpoint dir or an http(s):// endpoint)")
        if not self.data:
            self.data = [str(Path(self.out) / "traces.jsonl")]
        super().validate()
        if not 0 <= self.kd_weight <= 1:
            raise ConfigError(f"kd_weight = {self.kd_weight}: must be in [0, 1]")
        if self.kd_weight > 0 and is_url(self.teacher):
            raise ConfigError("--kd-weight needs the teacher's logits: give a local checkpoint, not an endpoint")


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DistillConfig)


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.run import run_config

    cfg = run_config(DistillConfig, args)
    distill(cfg)
    return 0


def endpoint_generator(base_url: str, model: str, num_samples: int, max_new_tokens: int, temperature: float,
                       api_key: str | None = None, timeout_s: float = 120.0):
    """generate(items, offset) -> N completion texts per item from POST {base}/v1/chat/completions."""
    url = base_url.rstrip("/")
    url = url if url.endswith("/v1") else url + "/v1"
    key = api_key or os.environ.get("OPENAI_API_KEY")

    def ask(question: str) -> list[str]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "n": num_samples,
                           "max_tokens": max_new_tokens, "temperature": temperature}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(url + "/chat/completions", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace")
            raise TeacherError(f"teacher endpoint {url} answered HTTP {e.code}: {detail}; check --teacher-model "
                               f"and --api-key") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TeacherError(f"teacher endpoint {url} refused the connection ({reason}); is the server "
                               f"running at --teacher?") from None
        except json.JSONDecodeError:
            raise TeacherError(f"teacher endpoint {url} did not answer JSON; is it OpenAI-compatible?") from None
        texts = []
        for choice in data.get("choices", []):
            msg = choice.get("message") or {}
            content, reasoning = msg.get("content") or "", msg.get("reasoning_content") or msg.get("reasoning")
            texts.append(f"<think>\n{reasoning.strip()}\n</think>\n{content.strip()}" if reasoning else content)
        return texts

    return lambda items, offset: [ask(item.question) for item in items]


def distill(cfg: DistillConfig) -> dict:
    """Stage 1: verified teacher traces in OUT/traces.jsonl; stage 2: SFT (+ KD) of the student on them."""
    import nanoseek
    from nanoseek.data.tasks import get_task
    from nanoseek.recipes.sample import engine_generator, write_traces
    from nanoseek.recipes.sft import sft

    traces = Path(cfg.data[0])
    marker = traces.with_name(traces.name + ".progress.json")
    finished = marker.is_file() and json.loads(marker.read_text())["done"] >= cfg.n_prompts
    teacher = None
    if not is_url(cfg.teacher) and (cfg.kd_weight > 0 or not finished):
        teacher = nanoseek.load_model(cfg.teacher).eval().requires_grad_(False)
    # ------------------------------------------------------------------ stage 1: teacher traces
    if not finished:
        if traces.exists() and not cfg.resume:
            raise ConfigError(f"{traces} exists; pass --resume to continue the run or choose another --out")
        items = get_task(cfg.task).generate(cfg.n_prompts, seed=cfg.seed, difficulty=cfg.difficulty)
        if teacher is None:
            gen = endpoint_generator(cfg.teacher, cfg.teacher_model, cfg.num_samples, cfg.max_new_tokens,
                                     cfg.temperature, cfg.api_key, cfg.timeout_s)
        else:
            from nanoseek.inference.llm import LLM
            from nanoseek.tokenizer import Tokenizer

            llm = LLM(teacher, Tokenizer.from_dir(cfg.teacher))
            gen = engine_generator(llm, llm.tokenizer, cfg.num_samples, cfg.max_new_tokens, cfg.temperature,
                                   cfg.seed)
        require = [r.strip() for r in cfg.require.split(",") if r.strip()]
        stats = write_traces(gen, items, traces, require, resume=cfg.resume, progress=cfg.progress)
        print(f"distill: kept {stats['kept']} of {stats['sampled']} teacher traces ({stats['prompts_with_any']} of "
              f"{stats['prompts']} problems) in {traces}", flush=True)
        if stats["kept"] == 0:
            raise ConfigError(f"the teacher solved none of the {stats['prompts']} problems; nothing to distill "
                              f"(try more --num-samples, an easier --difficulty or a stronger --teacher)")
    # ------------------------------------------------------------------ stage 2: the student
    result = sft(cfg, teacher=teacher if cfg.kd_weight > 0 else None, kd_weight=cfg.kd_weight,
                 kd_temperature=cfg.kd_temperature)
    result["traces"] = str(traces)
    return result
