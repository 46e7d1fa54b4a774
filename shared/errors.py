"""The client-error channel shared by every process.

`InvalidRequest` is the one exception that means "the client must change the request".
Validation at every hop (gateway, tokenizer worker, engine core) raises it; it travels
back to the gateway as a protocol `ErrorInfo` and is answered as OpenAI does:
a 400 with {"error": {message, type, param, code}}. Any other exception escaping a
request's handling is a bug: a 500, logged with its traceback, that never blames the client.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the client must change. `param` names the offending request field as
    the API spells it (None when no one field is at fault); `code` is OpenAI's machine
    readable reason where it has one (e.g. context_length_exceeded)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str) -> None:
    """The one check that a request fits the model's context: the prompt and at least one
    output token, and an explicit max_tokens in full (an error, as OpenAI and vLLM answer,
    never a silent cap). param: the request field holding the prompt (prompt / messages)."""
    if num_prompt_tokens + 1 > max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens (at most {max_model_len - 1} leave room for one output token).",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} in "
            f"the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
