"""Int8-activation probe checks: row invariance (bitwise, across M, plans and threads) and accuracy
against an fp64 reference of the same int4 weights and the unquantized x, next to the current
fused int4 kernel (csrc/int4_matmul.h).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/int8_activations/check.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vnni

from services.engine_core.fused_cpu import extension
from services.engine_core.fused_cpu.int4_matmul import repack
from services.engine_core.models.int4 import Int4Weight

SHAPES = {
    "q": (576, 576),
    "k": (192, 576),
    "gate": (1536, 576),
    "down": (576, 1536),
    "qkv": (960, 576),
    "odd": (208, 96),
}
PLANS = [(0, 0), (1, 4), (2, 4), (3, 4), (1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (6, 2), (4, 1), (8, 1), (12, 1)]
VARIANTS = (0, 1, 2, 3)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |out - ref| / rms(ref row) (a per-element relative error blows up where ref
    is near 0; the row's rms is the scale an output is read at)."""
    err = (out.double() - ref).abs() / ref.pow(2).mean(1, keepdim=True).sqrt()
    return err.max().item(), err.mean().item()


def main() -> int:
    torch.manual_seed(0)
    e = vnni.ext()
    fused = extension.load(extension.DEFAULT_CACHE_DIR)
    results: dict[str, dict] = {}
    ok = True
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.05
        q4 = Int4Weight.quantize(w)
        vw = vnni.from_int4(q4)
        vwi = vnni.from_int4(q4, interleaved=True)
        ref_w = vnni.dequantize(q4)
        # Activations like a layer's input: a few large channels, as LLM hidden states have.
        x = torch.randn(17, k)
        x[:, torch.randperm(k)[:4]] *= 20
        xb = x.to(torch.bfloat16)
        ref = xb.double() @ ref_w.t()
        # And plain Gaussian rows (no outlier channels).
        xg = torch.randn(17, k).to(torch.bfloat16)
        refg = xg.double() @ ref_w.t()
        # Row invariance: each row of every M-row call, plan and thread count == the row alone.
        alone = [vw(xb[m : m + 1], out_fp32=True) for m in range(17)]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for M in (1, 2, 3, 5, 9, 17):
                for R, J in PLANS:
                    for v in VARIANTS:
                        out = vw(xb[:M], R, J, v, out_fp32=True, prefetch=8 * (v % 2))
                        if M in (1, 9) and J > 1:  # the interleaved layout: the same bits
                            assert torch.equal(vwi(xb[:M], R, J, v, out_fp32=True), out)
                        for m in range(M):
                            if not torch.equal(out[m : m + 1], alone[m]):
                                print(f"ROW VARIANCE {name} M={M} R={R} J={J} variant={v} t={threads} row {m}")
                                ok = False
        torch.set_num_threads(2)
        out32 = vw(xb, out_fp32=True)
        outb = vw(xb)
        assert torch.equal(outb, out32.to(torch.bfloat16)), "bf16 output is the fp32 one rounded"
        r = {"vnni_fp32": rel_err(out32, ref), "vnni_bf16": rel_err(outb, ref)}
        r["vnni_fp32_gauss"] = rel_err(vw(xg, out_fp32=True), refg)
        # The activations' quantization alone, through fp64 (what the kernel approximates).
        xqd = e.quant_dequant_x(xb).double()
        # The kernel's quantization is q8_0's: d = max|x| / 127, round half to even, in fp32.
        xg32 = xb.float().view(17, k // 32, 32)
        d = xg32.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        assert torch.equal(e.quant_dequant_x(xb), ((xg32 * inv).round().clamp(-127, 127) * d).view(17, k))
        r["fakequant_x_fp64"] = rel_err(xqd @ ref_w.t(), ref)
        if fused is not None and n % 64 == 0:
            packed, sz = repack(q4)
            cur = fused.int4_matmul(xb, packed, sz)
            r["current_bf16"] = rel_err(cur, ref)
            r["current_bf16_gauss"] = rel_err(fused.int4_matmul(xg, packed, sz), refg)
        results[name] = {kk: {"max": v[0], "mean": v[1]} for kk, v in r.items()}
        print(name, (n, k), " ".join(f"{kk}: max {v[0]:.2e} mean {v[1]:.2e}" for kk, v in r.items()), flush=True)
    print(
        "row invariance:", "OK (bitwise, 6 shapes x M 1..17 x 13 plans x 4 variants x 1-2 threads)" if ok else "FAILED"
    )
    bench = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_path = os.path.join(bench, "results", "int8_activations_20261203", "check.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"row_invariance_ok": ok, "rel_err_vs_fp64_over_row_rms": results}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
