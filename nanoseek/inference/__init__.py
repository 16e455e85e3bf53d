"""The inference engine: paged latent cache, continuous batching, sampling, MTP speculative decoding.

One role per module (as nano-vllm): params (SamplingParams), sequence, block_manager (paged latent cache +
prefix cache), scheduler, runner (model execution), sampler, speculative (MTP drafts + rejection sampling),
engine (the step loop, streaming), llm (the vLLM-like facade), cli_generate / cli_chat (commands).
"""
from nanoseek.inference.engine import EngineConfig, LLMEngine
from nanoseek.inference.llm import LLM
from nanoseek.inference.params import RequestError, SamplingParams
from nanoseek.inference.sequence import CompletionOutput, Logprob, RequestOutput

__all__ = ["LLM", "SamplingParams", "LLMEngine", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestError"]
