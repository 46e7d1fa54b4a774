"""Build every Triton kernel launch the engine makes for an H100 (sm_90), on a machine without one.

The interpreter (TRITON_INTERPRET=1) checks the kernels' arithmetic on a CPU, but not whether
they compile for a GPU: it accepts code the compiler rejects, and knows nothing of registers.
This script runs the backend's launch wrappers on CPU tensors with the kernels swapped for
recorders, then compiles each recorded launch (argument types, 16-byte alignment and
divisibility as Triton's JIT would specialise them, num_warps) to a cubin with Triton's own
compiler and ptxas, and reads the kernel's register, local-memory and shared-memory use.

Run it without TRITON_INTERPRET (the kernels must be real JIT functions):
    python tests/engine_core/sm90_build.py [--json]
It prints one line per distinct build and exits 1 if any build fails or spills registers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("sm90_build.py needs real Triton kernels: unset TRITON_INTERPRET")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from services.engine_core.attention import triton_kernels as tk
from services.engine_core.attention.base import AttentionMetadata
from services.engine_core.attention.triton_backend import TritonAttentionBackend
from services.engine_core.model_config import ModelConfig

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
_OPTIONS = ("num_warps", "num_stages", "num_ctas")
_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass
class Build:
    kernel: str
    case: str
    constexprs: dict
    num_warps: int
    registers: int
    local_bytes: int
    shared_bytes: int
    error: str | None = None


class Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn: triton.JITFunction, launches: list) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))

        return launch


def _specialise(fn: triton.JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one launch, as the JIT would derive them."""
    bound = dict(zip(fn.arg_names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not p.do_not_specialize:
                signature[p.name], constexprs[p.name] = "constexpr", 1
                continue
            signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={value!r}")
    return signature, constexprs, attrs, options


def _resource_usage(cubin: bytes, name: str) -> tuple[int, int, int]:
    """(registers, local-memory bytes, static shared bytes) from cuobjdump."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"no resource usage for {name} in:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return reg, max(stack, local), shared


def build(fn: triton.JITFunction, args: tuple, kwargs: dict, case: str) -> Build:
    signature, constexprs, attrs, options = _specialise(fn, args, kwargs)
    shown = {k: v for k, v in constexprs.items() if isinstance(v, (int, str)) and k.isupper()}
    result = Build(fn.__name__, case, shown, options.get("num_warps", 4), 0, 0, 0)
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)
        # Dynamic shared memory (tiles staged by the compiler) is in the metadata, not the cubin.
        result.registers, result.local_bytes, static = _resource_usage(compiled.asm["cubin"], fn.__name__)
        result.shared_bytes = max(static, compiled.metadata.shared)
    except Exception as e:  # every failure is reported, not raised
        result.error = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    return result


def _metadata(query_lens: list[int], seq_lens: list[int], block_size: int) -> AttentionMetadata:
    i32 = torch.int32
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    blocks = max(-(-s // block_size) for s in seq_lens)
    return AttentionMetadata(
        num_reqs=len(seq_lens),
        num_tokens=starts[-1],
        query_start_loc=torch.tensor(starts, dtype=i32),
        seq_lens=torch.tensor(seq_lens, dtype=i32),
        block_tables=torch.zeros((len(seq_lens), blocks), dtype=i32),
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )


def cases() -> list[tuple[str, ModelConfig, torch.dtype, AttentionMetadata]]:
    """The launches a served step makes: every shipped model shape in bf16 (the GPU default),
    as a pure-decode batch that splits (batch 1 at a long context), one that does not (batch
    64), and a prefill chunk after a prefix hit; plus fp16 and fp32 on one shape."""
    config_dir = Path(__file__).resolve().parents[2] / "shared" / "model_configs"
    block = 16
    steps = {
        "decode b=1 ctx=4096": ([1], [4096]),
        "decode b=64 ctx=2048": ([1] * 64, [2048] * 64),
        "prefill 2x512 after 256 cached": ([512, 512], [768, 512]),
    }
    out = []
    for path in sorted(config_dir.glob("*.json")):
        if path.name.startswith("tiny-"):
            continue
        cfg = ModelConfig.from_hf_config(json.loads(path.read_text()))
        dtypes = [torch.bfloat16] + ([torch.float16, torch.float32] if path.stem == "qwen3-0.6b" else [])
        for dtype in dtypes:
            for step, (q, s) in steps.items():
                out.append((f"{path.stem} {str(dtype)[6:]} {step}", cfg, dtype, _metadata(q, s, block)))
    return out


def record(cfg: ModelConfig, dtype: torch.dtype, md: AttentionMetadata) -> list:
    """The kernel launches one attention layer of this step makes (write_kv then forward)."""
    launches: list = []
    saved = {n: getattr(tk, n) for n in ("_write_kv_kernel", "_paged_attention_kernel", "_merge_splits_kernel")}
    try:
        for name, fn in saved.items():
            setattr(tk, name, Recorder(fn, launches))
        backend = TritonAttentionBackend(torch.device("cpu"))
        backend._num_sms = H100_SMS  # plan the split count as on an H100
        t, d = md.num_tokens, cfg.head_dim
        q = torch.zeros((t, cfg.num_heads, d), dtype=dtype)
        kv = torch.zeros((t, cfg.num_kv_heads, d), dtype=dtype)
        cache = torch.zeros((64, 16, cfg.num_kv_heads, d), dtype=dtype)
        backend.write_kv(kv, kv, cache, cache.clone(), md)
        backend.forward(q, kv, kv, cache, cache.clone(), md, d**-0.5)
    finally:
        for name, fn in saved.items():
            setattr(tk, name, fn)
    return launches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the builds as JSON")
    args = parser.parse_args()
    builds: dict[str, Build] = {}
    for case, cfg, dtype, md in cases():
        for fn, a, kw in record(cfg, dtype, md):
            signature, constexprs, attrs, options = _specialise(fn, a, kw)
            key = repr(
                (
                    fn.__name__,
                    sorted(signature.items()),
                    sorted(map(repr, constexprs.items())),
                    sorted(map(repr, attrs.items())),
                    sorted(options.items()),
                )
            )
            if key not in builds:
                builds[key] = build(fn, a, kw, case)
    bad = [b for b in builds.values() if b.error or b.local_bytes]
    if args.json:
        print(json.dumps([asdict(b) for b in builds.values()], indent=1))
    else:
        print(f"triton {triton.__version__}, target sm_{TARGET.arch}: {len(builds)} distinct builds")
        for b in builds.values():
            status = b.error or f"{b.registers} regs, {b.local_bytes} B local, {b.shared_bytes} B shared"
            print(f"{b.kernel:<24} warps={b.num_warps} {b.constexprs}  [{b.case}]  {status}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
