"""NovaInfer: an OpenAI-compatible LLM server, and an offline API over the same engine.

from novainfer import LLM, SamplingParams
llm = LLM()  # the bundled SmolLM2-135M-Instruct
print(llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))[0].outputs[0].text)
"""

from shared.protocol import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> object:
    # Lazy, so `import novainfer` (e.g. for the CLI's --help) does not import torch.
    if name == "LLM":
        from novainfer.llm import LLM

        return LLM
    raise AttributeError(name)
