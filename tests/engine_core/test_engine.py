"""The whole engine (scheduler + block manager + runner + sampler) against transformers.

Greedy generation must match transformers token for token: one prompt alone, and
many prompts of different lengths batched together; and the engine's own features
(prefix cache, chunked prefill, preemption) must not change a single token. All of it in
the exact mode (--exact: float32, no int4): the CPU default's bf16 and int4 kernels round
differently by batch size (benchmarks/decode_agreement.py reports how much that changes).
"""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from novainfer.llm import LLM
from services.engine_core.engine import LLMEngine
from services.tokenizer_pool.tokenizer import load_tokenizer
from shared.config import EngineConfig
from shared.errors import InvalidRequest
from shared.model_files import bundled_model_path, resolve_model
from shared.protocol import SamplingParams

NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def run_engine(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], max_steps: int = 10_000
) -> dict[str, list[int]]:
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, plist, strict=True)):
        engine.add_request(f"r{i}", p, sp)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    assert not engine.has_unfinished()
    return out


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


# --- SmolLM2, the bundled model -----------------------------------------------------


@pytest.fixture(scope="module")
def smol_hf() -> torch.nn.Module:
    import os

    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def smol_llm() -> LLM:
    return LLM(config=EngineConfig(kv_cache_bytes=256 << 20, exact=True))


def test_smollm2_chat_answer(smol_llm: LLM) -> None:
    out = smol_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=32, temperature=0.0),
        use_tqdm=False,
    )[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_smollm2_parity_batched(smol_llm: LLM, smol_hf: torch.nn.Module) -> None:
    tok = smol_llm.tokenizer
    texts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time,",
        "List three colors:",
        "1, 2, 3, 4,",
        "Water boils at",
        "The quick brown fox",
        "In machine learning, a transformer is",
    ]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts[:4]]
    prompts += [tok.encode(t) for t in texts[4:]]
    got = run_engine(smol_llm.engine, prompts, GREEDY)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == hf_greedy(smol_hf, p), f"prompt {i} diverged"


# --- tiny random Llama / Qwen2 / Qwen3 ----------------------------------------------


def tiny_hf(name: str, tmp_path) -> tuple[torch.nn.Module, str]:
    cfg_dir = tmp_path / name
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(Path(resolve_model(name).path).read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # Spread-out weights so attention is far from uniform and bugs show.
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(cfg_dir)
    return model, str(cfg_dir)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_tiny_parity_batched(name: str, tmp_path) -> None:
    hf, path = tiny_hf(name, tmp_path)
    engine = LLMEngine(EngineConfig(model=path, kv_cache_bytes=8 << 20, max_num_batched_tokens=64, exact=True))
    lengths = [5, 17, 33, 1, 64, 9, 40, 23]
    prompts = random_prompts(engine.model_config.vocab_size, lengths)
    got = run_engine(engine, prompts, GREEDY)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == hf_greedy(hf, p), f"{name}: prompt {i} (len {len(p)}) diverged"


# --- engine features leave outputs unchanged ----------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return tiny_hf("tiny-llama", tmp_path_factory.mktemp("tiny"))[1]


def tiny_engine(path: str, **kw: object) -> LLMEngine:
    base = EngineConfig(model=path, kv_cache_bytes=8 << 20, block_size=4, max_num_batched_tokens=256, exact=True)
    return LLMEngine(msgspec.structs.replace(base, **kw))


def test_prefix_cache_hits_and_same_output(tiny_path: str) -> None:
    engine = tiny_engine(tiny_path)
    system = random_prompts(engine.model_config.vocab_size, [30], seed=1)[0]
    prompts = [system + p for p in random_prompts(engine.model_config.vocab_size, [3, 7, 11], seed=2)]
    first = run_engine(engine, prompts, GREEDY)
    hits_before = engine.block_manager.prefix_hits_total
    second = run_engine(engine, prompts, GREEDY)
    assert engine.block_manager.prefix_hits_total > hits_before
    assert first == second
    uncached = run_engine(tiny_engine(tiny_path, enable_prefix_caching=False), prompts, GREEDY)
    assert uncached == first


def test_chunked_prefill_same_output(tiny_path: str) -> None:
    prompts = random_prompts(512, [60, 3, 45, 8])
    whole = run_engine(tiny_engine(tiny_path), prompts, GREEDY)
    chunked = run_engine(tiny_engine(tiny_path, max_num_batched_tokens=7), prompts, GREEDY)
    assert chunked == whole


def test_preemption_same_output(tiny_path: str) -> None:
    prompts = random_prompts(512, [20, 25, 30, 12, 18, 22])
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = run_engine(tiny_engine(tiny_path), prompts, params)
    # 24 blocks of 4 tokens: six 60-token sequences cannot all fit, so some are preempted.
    cfg = resolve_model("tiny-llama").hf_config()
    block_bytes = (
        2
        * cfg["num_hidden_layers"]
        * 4
        * cfg["num_key_value_heads"]
        * (cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        * 4
    )  # k+v, fp32
    tight = tiny_engine(tiny_path, kv_cache_bytes=24 * block_bytes)
    assert tight.block_manager.num_blocks == 24
    assert run_engine(tight, prompts, params) == roomy
    assert tight.scheduler.preemptions_total > 0


def test_seeded_sampling_reproducible_across_batches(tiny_path: str) -> None:
    prompts = random_prompts(512, [10, 20, 30])
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_engine(tiny_engine(tiny_path), prompts[:1], seeded)["r0"]
    mixed = run_engine(
        tiny_engine(tiny_path),
        prompts[1:] + prompts[:1],
        [SamplingParams(max_tokens=24, temperature=0.7, ignore_eos=True)] * 2 + [seeded],
    )["r2"]
    assert alone == mixed
    other_seed = msgspec.structs.replace(seeded, seed=99)
    assert run_engine(tiny_engine(tiny_path), prompts[:1], other_seed)["r0"] != alone


def test_abort_frees_blocks(tiny_path: str) -> None:
    engine = tiny_engine(tiny_path)
    free = engine.block_manager.num_free_blocks
    engine.add_request("a", list(range(3, 40)), GREEDY)
    engine.add_request("b", list(range(3, 20)), GREEDY)
    engine.step()
    engine.step()
    assert engine.block_manager.usage > 0
    outs = engine.abort(["a", "b"])
    assert {o.request_id for o in outs} == {"a", "b"} and all(o.finish_reason == "abort" for o in outs)
    assert engine.block_manager.usage == 0
    assert engine.block_manager.num_free_blocks == free
    assert not engine.has_unfinished()


def test_rejects_prompt_longer_than_context(tiny_path: str) -> None:
    engine = tiny_engine(tiny_path, max_model_len=32)
    with pytest.raises(InvalidRequest, match="maximum context length is 32 tokens, but the prompt has 37") as exc:
        engine.add_request("x", list(range(3, 40)), GREEDY)
    assert (exc.value.param, exc.value.code) == ("prompt", "context_length_exceeded")
    # An explicit max_tokens that cannot fit is an error, as the tokenizer worker answers, not a silent cap.
    with pytest.raises(InvalidRequest, match="you requested 40 tokens") as exc:
        engine.add_request("z", list(range(3, 27)), SamplingParams(max_tokens=16))
    assert exc.value.param == "max_tokens"
    with pytest.raises(InvalidRequest):
        engine.add_request("y", [10**6], GREEDY)


def test_stop_token_and_max_tokens(tiny_path: str) -> None:
    engine = tiny_engine(tiny_path)
    prompt = random_prompts(512, [12])[0]
    free_run = run_engine(engine, [prompt], GREEDY)["r0"]
    stop_at = free_run[5]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=[stop_at])
    engine.add_request("s", prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == free_run[: free_run.index(stop_at) + 1]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_token_id == stop_at


def test_rejects_out_of_vocabulary_stop_token_ids(tiny_path: str) -> None:
    engine = tiny_engine(tiny_path)
    vocab = engine.model_config.vocab_size
    for bad in (vocab, 10**9, 2**63 - 1):
        with pytest.raises(ValueError, match="stop_token_ids"):
            engine.add_request("x", [5, 6], SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=[bad]))
    assert not engine.has_unfinished()


def test_poisoned_request_fails_alone_in_a_full_batch(tiny_path: str) -> None:
    """A request that makes the step raise (here: a stop id past the vocabulary slipped past
    validation, which indexes out of range in the sampler's min_tokens mask) fails with an
    error; every other request of the batch completes exactly as without it."""
    prompts = random_prompts(512, [5, 9, 13, 7, 11, 6, 8, 10])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    clean = run_engine(tiny_engine(tiny_path), prompts, params)

    engine = tiny_engine(tiny_path)
    for i, p in enumerate(prompts[:4]):
        engine.add_request(f"r{i}", p, params)
    poison = SamplingParams(max_tokens=12, min_tokens=4, temperature=0.0)
    engine.add_request("poison", prompts[0], poison)
    poison.stop_token_ids = [10**9]  # after add_request's check, as a validation bug would let it in
    for i, p in enumerate(prompts[4:], start=4):
        engine.add_request(f"r{i}", p, params)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    errors = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.error is not None:
                errors.append(o)
            else:
                out[o.request_id].extend(o.new_token_ids)
    assert [(e.request_id, e.finish_reason, e.error and e.error.status) for e in errors] == [("poison", "abort", 500)]
    assert "internal engine error" in (errors[0].error.message if errors[0].error else "")
    assert out == clean
    assert engine.block_manager.usage == 0


@pytest.mark.parametrize(
    ("model", "requested"),
    [("hf-dir", None), ("hf-dir", 1 << 20), ("tiny-qwen3", 64), ("tiny-qwen2", None), ("smollm2", 512)],
)
def test_engine_and_tokenizer_pool_agree_on_model_facts(tiny_path: str, model: str, requested: int | None) -> None:
    """Both processes resolve the context length and EOS ids with shared/model_info.py: for a
    HF directory (with its generation_config.json), a bare config and a GGUF file."""
    # The tiny HF directory holds weights only: it borrows the bundled tokenizer.
    hf_dir = model == "hf-dir"
    config = EngineConfig(
        model=tiny_path if hf_dir else model,
        tokenizer=bundled_model_path() if hf_dir else None,
        max_model_len=requested,
        kv_cache_bytes=8 << 20,
    )
    engine = LLMEngine(config)
    tokenizer = load_tokenizer(config)
    assert engine.max_model_len == tokenizer.max_model_len
    if requested is not None:
        assert engine.max_model_len <= requested
    # The pool may add its tokenizer's EOS; every id the engine would stop at, the pool stops at too.
    assert engine.eos_token_ids and set(engine.eos_token_ids) <= set(tokenizer.eos_token_ids)
