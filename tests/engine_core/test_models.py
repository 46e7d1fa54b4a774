"""Our Llama-family model and weight loader against transformers, the reference.

Each architecture's tiny config gets random HF weights, saved as safetensors (or
written as GGUF) and loaded by our loader; the bundled SmolLM2 GGUF is compared with
transformers' own GGUF loading. Logits must match both for a one-shot prefill and for
chunked prefills + decodes through a paged KV cache with a shuffled block table, with
two requests interleaved in the same steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.attention.torch_backend import TorchAttentionBackend
from services.engine_core.model_config import ModelConfig
from services.engine_core.models import CausalLM, WeightError
from services.engine_core.weight_loader import load_model
from shared.config import EngineConfig
from shared.model_files import resolve_model

CPU = torch.device("cpu")
BLOCK_SIZE = 4
NUM_BLOCKS = 24
TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]


# --- helpers ------------------------------------------------------------------------


def hf_tiny_model(name: str, tmp_path, **overrides: object) -> torch.nn.Module:
    """transformers' model for one of our tiny configs (with `overrides` of its fields), with
    weights large enough that attention is far from uniform (so position/mask bugs show) and
    non-trivial norms."""
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    with open(resolve_model(name).path) as f:
        (cfg_dir / "config.json").write_text(json.dumps({**json.load(f), **overrides}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg_dir), dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith("embed_tokens.weight"):
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.15)
    return model.eval()


def save_hf(model: torch.nn.Module, path) -> str:
    model.save_pretrained(path)
    return str(path)


@torch.inference_mode()
def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens])).logits[0].float()


def kv_caches(model: CausalLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cfg, dtype = model.cfg, model.embed.dtype
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(cfg.num_layers)]


def step_metadata(rows: list[tuple[list[int], int, int]]) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata and positions for one step; rows: (block_table, num_cached, num_new) per request."""
    slots, positions, starts = [], [], [0]
    for table, start, n in rows:
        positions += range(start, start + n)
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, start + n)]
        starts.append(starts[-1] + n)
    width = max(len(t) for t, _, _ in rows)
    i32 = torch.int32
    md = AttentionMetadata(
        num_reqs=len(rows),
        num_tokens=len(slots),
        query_start_loc=torch.tensor(starts, dtype=i32),
        seq_lens=torch.tensor([s + n for _, s, n in rows], dtype=i32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t, _, _ in rows], dtype=i32),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        max_query_len=max(n for _, _, n in rows),
        max_seq_len=max(s + n for _, s, n in rows),
        query_lens_cpu=[n for _, _, n in rows],
        seq_lens_cpu=[s + n for _, s, n in rows],
    )
    return md, torch.tensor(positions, dtype=torch.long)


@torch.inference_mode()
def prefill_logits(model: CausalLM, tokens: list[int]) -> torch.Tensor:
    md, pos = step_metadata([(list(range(NUM_BLOCKS)), 0, len(tokens))])
    hidden = model(torch.tensor(tokens), pos, kv_caches(model), md, TorchAttentionBackend())
    return model.compute_logits(hidden)


@torch.inference_mode()
def paged_logits(model: CausalLM, seqs: list[list[int]], schedule: list[list[int]]) -> list[torch.Tensor]:
    """Run the sequences through a shared paged cache, schedule[step][i] new tokens of
    sequence i per step (0: not scheduled); returns each sequence's logits, row per token."""
    caches, backend = kv_caches(model), TorchAttentionBackend()
    blocks = list(range(NUM_BLOCKS))
    random.Random(0).shuffle(blocks)
    tables, out = [], []
    for s in seqs:
        n = -(-len(s) // BLOCK_SIZE)
        tables.append(blocks[:n])
        blocks = blocks[n:]
        out.append([])
    done = [0] * len(seqs)
    for counts in schedule:
        active = [i for i, n in enumerate(counts) if n]
        md, pos = step_metadata([(tables[i], done[i], counts[i]) for i in active])
        ids = torch.tensor([t for i in active for t in seqs[i][done[i] : done[i] + counts[i]]])
        logits = model.compute_logits(model(ids, pos, caches, md, backend))
        for i, rows in zip(active, logits.split([counts[i] for i in active]), strict=True):
            out[i].append(rows)
            done[i] += counts[i]
    assert done == [len(s) for s in seqs]
    return [torch.cat(rows) for rows in out]


def assert_logits_match(ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, f"relative logit error {err:.2e} >= {tol:.0e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def check_against_hf(model: CausalLM, hf: torch.nn.Module, vocab: int, tol: float) -> None:
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (14, 11)]
    refs = [hf_logits(hf, s) for s in seqs]
    assert_logits_match(prefill_logits(model, seqs[0]), refs[0], tol)
    # Chunked prefills, a mixed prefill+decode step, then decodes of both.
    schedule = [[6, 0], [6, 7], [1, 3], [1, 1]]
    for ours, ref in zip(paged_logits(model, seqs, schedule), refs, strict=True):
        assert_logits_match(ours, ref, tol)


# --- configs --------------------------------------------------------------------------


def test_published_configs() -> None:
    q2 = ModelConfig.from_hf_config(resolve_model("qwen2.5-1.5b").hf_config())
    assert (q2.architecture, q2.attention_bias, q2.qk_norm, q2.head_dim, q2.num_kv_heads) == (
        "qwen2",
        True,
        False,
        128,
        2,
    )
    q3 = ModelConfig.from_hf_config(resolve_model("qwen3-0.6b").hf_config())
    assert (q3.qk_norm, q3.attention_bias, q3.head_dim) == (True, False, 128)
    ll = ModelConfig.from_hf_config(resolve_model("llama-3.2-1b").hf_config())
    assert ll.rope_scaling is not None and ll.rope_scaling["rope_type"] == "llama3"
    assert ll.tie_word_embeddings and ll.head_dim == 64 and ll.rope_theta == 500000.0


def test_unsupported_configs_are_rejected() -> None:
    base = resolve_model("tiny-llama").hf_config()
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_hf_config({**base, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="sliding"):
        ModelConfig.from_hf_config({**base, "use_sliding_window": True})


# --- parity with transformers ------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_hf_safetensors_parity(name: str, tmp_path) -> None:
    hf = hf_tiny_model(name, tmp_path)
    model, cfg = load_model(EngineConfig(model=save_hf(hf, tmp_path / "hf"), exact=True), CPU, torch.float32)
    assert cfg == ModelConfig.from_hf_config(resolve_model(name).hf_config())
    check_against_hf(model, hf, cfg.vocab_size, tol=1e-5)


_TO_GGUF = {
    "embed_tokens": "token_embd",
    "norm": "output_norm",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gguf(hf: torch.nn.Module, cfg: ModelConfig, path: str) -> None:
    """A float32 GGUF with llama.cpp's tensor names and '{arch}.*' metadata keys."""
    arch = cfg.architecture
    w = gguf.GGUFWriter(path, arch)
    for key, value in [
        ("block_count", cfg.num_layers),
        ("context_length", cfg.max_position_embeddings),
        ("embedding_length", cfg.hidden_size),
        ("feed_forward_length", cfg.intermediate_size),
        ("attention.head_count", cfg.num_heads),
        ("attention.head_count_kv", cfg.num_kv_heads),
        ("attention.key_length", cfg.head_dim),
    ]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_eos_token_id(2)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            parts = name.removeprefix("model.").split(".")
            if parts[0] == "layers":
                gguf_name = f"blk.{parts[1]}.{_TO_GGUF['.'.join(parts[2:-1])]}.{parts[-1]}"
            else:
                gguf_name = f"{_TO_GGUF[parts[0]]}.{parts[-1]}"
        w.add_tensor(gguf_name, tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_gguf_parity(name: str, tmp_path) -> None:
    """Qwen GGUFs (q/k biases, q/k norms; no llama.cpp q/k permutation for these archs)."""
    hf = hf_tiny_model(name, tmp_path)
    cfg = ModelConfig.from_hf_config(resolve_model(name).hf_config())
    path = str(tmp_path / f"{name}.gguf")
    write_gguf(hf, cfg, path)
    model, got = load_model(EngineConfig(model=path, cache_dir=str(tmp_path / "cache"), exact=True), CPU, torch.float32)
    assert got.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)  # stored as float32
    assert got == dataclasses.replace(cfg, rms_norm_eps=got.rms_norm_eps)
    check_against_hf(model, hf, cfg.vocab_size, tol=1e-5)


@pytest.fixture(scope="module")
def smollm2_hf() -> torch.nn.Module:
    path = resolve_model("smollm2").path
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return hf.eval()


def test_smollm2_gguf_parity(smollm2_hf: torch.nn.Module, tmp_path) -> None:
    # Exact: the CPU default would add int4 copies of this Q4_1 file's layers (test_int4.py).
    engine_config = EngineConfig(model="smollm2", cache_dir=str(tmp_path), exact=True)
    model, cfg = load_model(engine_config, CPU, torch.float32)
    assert (cfg.architecture, cfg.num_layers, cfg.tie_word_embeddings) == ("llama", 30, True)
    assert cfg.vocab_size == 49152
    assert len(os.listdir(tmp_path)) == 1  # the dequantized cache
    cached, cached_cfg = load_model(engine_config, CPU, torch.float32)
    assert cached_cfg == cfg
    for (name, p), (_, q) in zip(model.state_dict().items(), cached.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    check_against_hf(cached, smollm2_hf, cfg.vocab_size, tol=1e-4)


# --- loading --------------------------------------------------------------------------------


def test_bad_checkpoints_name_the_tensor(tmp_path) -> None:
    hf = hf_tiny_model("tiny-qwen2", tmp_path)
    model_dir = save_hf(hf, tmp_path / "hf")
    weights_path = os.path.join(model_dir, "model.safetensors")
    good = load_file(weights_path)
    up = "model.layers.1.mlp.up_proj.weight"
    cases = [
        ({k: v for k, v in good.items() if k != up}, rf"missing.*{up}"),
        ({**good, up: good[up][:-1]}, rf"{up} has shape \(159, 64\), expected \(160, 64\)"),
        ({**good, "model.layers.1.mlp.extra.weight": good[up].clone()}, "unexpected weight model.layers.1.mlp.extra"),
    ]
    for weights, message in cases:
        save_file(weights, weights_path)
        with pytest.raises(WeightError, match=message):
            load_model(EngineConfig(model=model_dir), CPU, torch.float32)


def test_sharded_safetensors_and_dtype(tmp_path) -> None:
    hf = hf_tiny_model("tiny-llama", tmp_path)
    model_dir = tmp_path / "hf"
    hf.save_pretrained(model_dir, max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").exists()
    model, _ = load_model(EngineConfig(model=str(model_dir)), CPU, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = hf_logits(hf, list(range(10)))
    ours = prefill_logits(model, list(range(10)))
    assert ours.dtype == torch.float32
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 5e-2


def test_random_weights_from_config() -> None:
    first, cfg = load_model(EngineConfig(model="tiny-qwen3", seed=3), CPU, torch.float32)
    again, _ = load_model(EngineConfig(model="tiny-qwen3", seed=3), CPU, torch.float32)
    other, _ = load_model(EngineConfig(model="tiny-qwen3", seed=4), CPU, torch.float32)
    assert torch.equal(first.embed, again.embed) and not torch.equal(first.embed, other.embed)
    assert torch.all(first.layers[0].q_norm == 1) and torch.all(first.norm == 1)
    assert 0.015 < first.layers[1].gate_up_weight.std().item() < 0.025
    logits = prefill_logits(first, [5, 6, 7])
    assert logits.shape == (3, cfg.vocab_size) and torch.isfinite(logits).all()
