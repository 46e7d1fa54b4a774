"""Builds the int8-activation probe (vnni_matmul.cpp) and repacks an Int4Weight's q, scales and zeros
into its layout (no requantization: the same (q - 8) * s + z values)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from services.engine_core.fused_cpu.int4_matmul import unpack_q
from services.engine_core.models.int4 import GROUP, Int4Weight

HERE = os.path.dirname(os.path.abspath(__file__))
_ext: ModuleType | None = None


def ext() -> ModuleType:
    global _ext
    if _ext is None:
        import ninja
        from torch.utils import cpp_extension

        os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))
        build = os.path.join(tempfile.gettempdir(), "novainfer-int8-activations-build")
        os.makedirs(build, exist_ok=True)
        _ext = cpp_extension.load(
            name="novainfer_int8_activations_probe",
            sources=[os.path.join(HERE, "vnni_matmul.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            build_directory=build,
            verbose=False,
        )
    return _ext


@dataclass
class VnniWeight:
    packed: Tensor  # uint8 [Np / 16, K / 8, 64]
    s: Tensor  # fp32 [K / 32, Np]
    z: Tensor  # fp32 [K / 32, Np]
    sz: Tensor  # bf16 [K / 32, 2, Np]: the same values (the kernel reads one or the other)
    n: int

    def __call__(
        self, x: Tensor, R: int = 0, J: int = 0, variant: int = -1, out_fp32: bool = False, prefetch: int = 0
    ) -> Tensor:
        return ext().vnni_matmul(x, self.packed, self.s, self.z, self.sz, self.n, R, J, variant, out_fp32, prefetch)


def pack(q: Tensor) -> Tensor:
    """q (0..15) uint8 [N, K] -> [Np / 16, K / 8, 64]: byte 4 l + i of (vector v, chunk c) =
    q[16 v + l, 8 c + i] | q[16 v + l, 8 c + 4 + i] << 4."""
    n, k = q.shape
    np_ = -(-n // 16) * 16
    padded = torch.zeros(np_, k, dtype=torch.uint8)
    padded[:n] = q
    v = padded.view(np_ // 16, 16, k // 8, 2, 4)  # [V, lane, chunk, half, i]
    bytes_ = v[:, :, :, 0, :] | (v[:, :, :, 1, :] << 4)  # [V, lane, chunk, i]
    return bytes_.permute(0, 2, 1, 3).contiguous().view(np_ // 16, k // 8, 64)


def pack_interleaved(q: Tensor) -> Tensor:
    """q (0..15) uint8 [N, K] -> [Np / 64, K / 8, 256]: pack()'s 64-byte lines of a strip's four
    vectors side by side, chunk by chunk, so that a strip (and a thread's run of strips) is one
    sequential stream."""
    n, k = q.shape
    np_ = -(-n // 64) * 64
    padded = torch.zeros(np_, k, dtype=torch.uint8)
    padded[:n] = q
    lines = pack(padded).view(np_ // 64, 4, k // 8, 64)  # [strip, j, chunk, 64]
    return lines.transpose(1, 2).contiguous().view(np_ // 64, k // 8, 256)


def from_int4(weight: Int4Weight, interleaved: bool = False) -> VnniWeight:
    q = unpack_q(weight)
    n, k = q.shape
    np_ = -(-n // (64 if interleaved else 16)) * (64 if interleaved else 16)
    sz = weight.scales_zeros.float()  # [K / 32, N, 2]
    s = torch.zeros(k // GROUP, np_)
    z = torch.zeros(k // GROUP, np_)
    s[:, :n], z[:, :n] = sz[..., 0], sz[..., 1]
    sz_ = torch.stack((s, z), 1).to(torch.bfloat16).contiguous()
    packed = pack_interleaved(q) if interleaved else pack(q)
    return VnniWeight(packed, s.contiguous(), z.contiguous(), sz_, n)


def dequantize(weight: Int4Weight) -> Tensor:
    """The exact fp64 matrix (q - 8) * s + z [N, K] (bf16 s and z, no output rounding)."""
    q = unpack_q(weight).double()
    sz = weight.scales_zeros.double()  # [K / 32, N, 2]
    s = sz[..., 0].t().repeat_interleave(GROUP, dim=1)
    z = sz[..., 1].t().repeat_interleave(GROUP, dim=1)
    return (q - 8) * s + z


def git_rev() -> str:
    """The checkout's commit, for a result's record."""
    root = os.path.dirname(os.path.dirname(HERE))
    return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def write_json(path: str, out: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
