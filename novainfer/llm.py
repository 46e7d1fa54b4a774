"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`.

The engine runs in this process, stepped in a loop. Text goes through the same
tokenizer, chat template, incremental detokenizer and stop-string handling as the
server's tokenizer pool, so offline and served outputs are identical.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import msgspec
from tqdm import tqdm

from services.engine_core.engine import LLMEngine
from services.tokenizer_pool.detokenizer import RequestStream
from services.tokenizer_pool.reasoning_parser import ReasoningParser, detect_family, reasoning_for_prompt
from services.tokenizer_pool.tokenizer import Tokenizer, load_tokenizer
from shared.config import EngineConfig
from shared.errors import InvalidRequest
from shared.protocol import SamplingParams, TextLogprob

Prompt = str | Sequence[int]
Conversation = Sequence[Mapping[str, str]]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TextLogprob] | None = None
    reasoning_content: str | None = None
    """chat() under a reasoning parser: the thinking (text is then the answer)."""
    num_reasoning_tokens: int = 0
    """chat() under a reasoning parser: how many of token_ids are the thinking (its tags included)."""


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class _Child(NamedTuple):
    """One engine request of a prompt's n samples."""

    stream: RequestStream
    completion: CompletionOutput
    result: RequestOutput
    reasoning: ReasoningParser | None


class LLM:
    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **engine_args: Any) -> None:
        config = config or EngineConfig()
        if model is not None:
            engine_args["model"] = model
        self.config = msgspec.structs.replace(config, **engine_args)
        self.tokenizer: Tokenizer = load_tokenizer(self.config)
        self.engine = LLMEngine(self.config)
        self.engine.set_tokenizer_vocab(self.tokenizer.backend.to_str(), self.tokenizer.eos_token_ids)
        self._ids = itertools.count()
        family = self.config.reasoning_parser
        self.reasoning_family = (
            detect_family(self.tokenizer) if family == "auto" else None if family == "none" else family
        )
        """How chat() splits outputs into reasoning_content and text (as the server's tokenizer pool)."""

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Prompts are text (tokenized with special tokens, no chat template) or token ids."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        batch = cast("Sequence[Prompt]", [prompts] if single else prompts)
        items: list[tuple[str | None, list[int]]] = []
        for p in batch:
            if isinstance(p, str):
                items.append((p, self.tokenizer.encode(p)))
            else:
                items.append((None, list(p)))
        return self._run(items, sampling_params, use_tqdm, chat=False)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {'role', 'content'}) or a list of them, through the
        model's own chat template."""
        single = messages and isinstance(messages[0], Mapping)
        conversations = cast("Sequence[Conversation]", [messages] if single else messages)
        items: list[tuple[str | None, list[int]]] = []
        for conv in conversations:
            text = self.tokenizer.render_chat(conv, add_generation_prompt)
            items.append((text, self.tokenizer.apply_chat_template(conv, add_generation_prompt)))
        return self._run(items, sampling_params, use_tqdm, chat=True)

    def _run(
        self,
        items: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
        chat: bool,
    ) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError("give one SamplingParams, or one per prompt")

        results: list[RequestOutput] = []
        streams: dict[str, _Child] = {}
        now = time.time()
        try:
            self._add_all(items, params_list, now, results, streams, chat)
        except Exception:
            self.engine.abort(list(streams))  # nothing half-submitted stays in the engine
            raise
        self._drain(streams, use_tqdm)
        return results

    def _add_all(
        self,
        items: list[tuple[str | None, list[int]]],
        params_list: list[SamplingParams],
        now: float,
        results: list[RequestOutput],
        streams: dict[str, _Child],
        chat: bool,
    ) -> None:
        for (text, ids), params in zip(items, params_list, strict=True):
            params.validate()
            result = RequestOutput(str(next(self._ids)), text, ids, [])
            results.append(result)
            for i, child in enumerate(params.fan_out()):
                rid = f"{result.request_id}-{i}"
                completion = CompletionOutput(index=i)
                result.outputs.append(completion)
                parser, reasoning = None, None
                if chat and text is not None:
                    parser, reasoning = reasoning_for_prompt(self.tokenizer, self.reasoning_family, text)
                self.engine.add_request(rid, ids, child, self.tokenizer.eos_token_ids, now, reasoning)
                stream = RequestStream(rid, self.tokenizer, child, num_prompt_tokens=len(ids), engine=0)
                streams[rid] = _Child(stream, completion, result, parser)

    def _drain(
        self,
        streams: dict[str, _Child],
        use_tqdm: bool,
    ) -> None:
        bar = tqdm(total=len(streams), desc="generating", unit="req", disable=not use_tqdm)
        while self.engine.has_unfinished():
            if self.engine.only_compiling:
                time.sleep(0.002)  # grammars compile in a thread: let it have the GIL
            for out in self.engine.step():
                if out.error is not None:  # e.g. a grammar that cannot be compiled: as add_request would
                    self.engine.abort(list(streams))
                    error = out.error
                    if error.status >= 500:
                        raise RuntimeError(error.message)
                    raise InvalidRequest(error.message, param=error.param, code=error.code)
                stream, completion, result, parser = streams[out.request_id]
                if stream.finished:
                    continue
                delta = stream.process(out)
                if parser is not None:
                    parser.split(delta, stream)
                    completion.num_reasoning_tokens = delta.num_reasoning_tokens
                    if delta.reasoning_text:  # None, as the server omits it, when there was no thinking
                        completion.reasoning_content = (completion.reasoning_content or "") + delta.reasoning_text
                completion.text += delta.text
                completion.token_ids.extend(delta.token_ids)
                if delta.logprobs is not None:
                    completion.logprobs = (completion.logprobs or []) + delta.logprobs
                result.num_cached_tokens = delta.num_cached_tokens
                if delta.finish_reason is not None:
                    completion.finish_reason = delta.finish_reason
                    completion.stop_reason = delta.stop_reason
                    bar.update(1)
                if stream.abort_in_engine:
                    self.engine.abort([out.request_id])
        bar.close()
