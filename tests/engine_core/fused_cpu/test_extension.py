"""The extension's build flags: the at::vec capability follows the CPU, narrowed as ATen's own
dispatch is by ATEN_CPU_CAPABILITY (how the AVX2 kernels are tested on an AVX-512 host)."""

from __future__ import annotations

import pytest

from services.engine_core.fused_cpu import extension

ZEN4 = "avx avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16"
ZEN3 = "avx avx2 fma"


@pytest.mark.parametrize(
    "cpu, requested, expected",
    [
        (ZEN4, None, "avx512"),
        (ZEN4, "", "avx512"),
        (ZEN4, "AVX2", "avx2"),
        (ZEN4, "default", "default"),
        (ZEN3, None, "avx2"),
        (ZEN3, "avx512", "avx2"),  # never wider than the CPU
        (ZEN3, "zvector", "avx2"),  # another architecture's name: ignored
        ("sse4_2", None, "default"),
    ],
)
def test_capability(cpu: str, requested: str | None, expected: str) -> None:
    assert extension.capability(cpu, requested) == expected


def test_avx2_build_on_avx512_host_turns_avx512_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX2 build on an AVX-512 CPU: at::vec's AVX2 types, and no __AVX512F__ for the kernels
    the compiler's macros choose; its own build key (a separate cached build)."""
    monkeypatch.setattr(extension, "_cpu_flags", lambda: ZEN4)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    native, native_key = extension.cflags(), extension.build_key()
    assert "-DCPU_CAPABILITY_AVX512" in native and "-mno-avx512f" not in native
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    avx2 = extension.cflags()
    assert "-DCPU_CAPABILITY_AVX2" in avx2 and avx2[-1] == "-mno-avx512f"
    assert extension.build_key() != native_key
