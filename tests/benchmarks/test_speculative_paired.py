"""benchmarks/speculative_paired.py: the units, the turn order and the paired ratios (no server)."""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
)

import serve_bench as sb
import speculative as spec
import speculative_paired as paired


def test_units_are_single_requests_or_batches_of_c() -> None:
    args = spec.make_parser().parse_args(["--requests-per-conc", "2", "--min-requests", "5"])
    jobs = spec.jobs_for("grounded", 1, args)
    assert [len(u) for u in paired.units(jobs, 1)] == [1] * 5
    jobs = spec.jobs_for("random", 8, args)
    assert [len(u) for u in paired.units(jobs, 8)] == [8, 8]
    assert [len(u) for u in paired.units(jobs[:10], 4)] == [4, 4, 2]
    assert [j for u in paired.units(jobs, 8) for j in u] == jobs  # every request once, in order


def test_turn_order_rotates_who_goes_first() -> None:
    assert [paired.turn_order(["off", "suffix"], i) for i in range(3)] == [
        ["off", "suffix"],
        ["suffix", "off"],
        ["off", "suffix"],
    ]
    three = [paired.turn_order(["off", "ngram", "suffix"], i)[0] for i in range(6)]
    assert three == ["off", "ngram", "suffix"] * 2
    assert all(sorted(paired.turn_order(["a", "b", "c"], i)) == ["a", "b", "c"] for i in range(5))


def test_ratio_summary() -> None:
    s = paired.ratio_summary([2.0, 0.5, 1.0, 4.0, 1.0])
    assert s["n"] == 5 and s["median"] == 1.0
    assert math.isclose(s["geomean"], 2 ** (2 / 5))
    lo, hi = s["ci95"]
    assert 0.5 <= lo <= s["geomean"] <= hi <= 4.0
    assert paired.ratio_summary([2.0, 0.5, 1.0, 4.0, 1.0]) == s  # seeded
    same = paired.ratio_summary([1.5] * 7)
    assert same["ci95"] == [1.5, 1.5] and math.isclose(same["geomean"], 1.5)
    none = paired.ratio_summary([math.nan, 0.0])
    assert none == {"n": 0, "median": None, "geomean": None, "ci95": None}


def result(tokens: int, ttft: float, e2e: float, ok: bool = True) -> tuple[sb.RequestSpec, sb.Result]:
    return sb.RequestSpec("/v1/completions", {"prompt": "x"}, tokens), sb.Result(
        ok=ok, ttft=ttft, e2e=e2e, output_tokens=tokens
    )


def test_paired_ratios_per_unit() -> None:
    off = [paired.UnitRun(1.0, [result(11, 0.0, 1.0)]), paired.UnitRun(2.0, [result(11, 0.0, 2.0)])]
    fast = [paired.UnitRun(0.5, [result(11, 0.0, 0.5)]), paired.UnitRun(0.5, [result(11, 0.0, 0.5)])]
    r = paired.paired_ratios(off, fast)
    assert r["output_tok_per_s_ratio"] == [2.0, 4.0]
    assert r["tpot_speedup"] == [2.0, 4.0]  # TPOT: (e2e - ttft) / (tokens - 1)
    # A unit with a failed or cut-off request on either side pairs nothing.
    broken = [paired.UnitRun(0.5, [result(11, 0.0, 0.5, ok=False)]), paired.UnitRun(0.5, [], unfinished=1)]
    assert paired.paired_ratios(off, broken) == {"output_tok_per_s_ratio": [], "tpot_speedup": []}
    batch = paired.UnitRun(1.0, [result(10, 0.1, 1.0), result(20, 0.1, 1.0)])
    assert batch.tok_per_s == 30.0 and math.isclose(batch.tpot, (0.9 / 9 + 0.9 / 19) / 2)


def test_paired_flag() -> None:
    assert not spec.make_parser().parse_args([]).paired
    assert spec.make_parser().parse_args(["--paired"]).paired


def test_compare_keeps_the_sequential_fields_and_adds_the_pairs() -> None:
    runs = [
        {"method": "off", "workload": "grounded", "concurrency": 1, "output_tok_per_s": 10.0, "tpot_p50_s": 0.1},
        {
            "method": "suffix",
            "workload": "grounded",
            "concurrency": 1,
            "output_tok_per_s": 20.0,
            "tpot_p50_s": 0.05,
            "outputs_same_as_off": 1.0,
            "paired": {"output_tok_per_s_ratio": paired.ratio_summary([2.0, 2.0])},
        },
    ]
    (c,) = paired.compare_paired(runs)
    assert c["output_tok_per_s_ratio"] == 2.0 and c["outputs_same_as_off"] == 1.0
    assert c["paired"]["output_tok_per_s_ratio"]["median"] == 2.0


def test_process_cpu_by_role() -> None:
    import process_cpu

    assert process_cpu.role_of("python -m services.engine_core --port 1") == "engine_core"
    assert process_cpu.role_of("python -m services.tokenizer_pool --port 1") == "tokenizer_pool"
    assert process_cpu.role_of("python -m services.gateway") == "gateway"
    assert process_cpu.role_of("python -m novainfer.cli serve") is None
    mine = process_cpu.roles(os.getpid())  # this test process stands for a launcher
    assert set(mine) == set(process_cpu.ROLES) and mine["launcher"] > 0 and mine["engine_core"] == 0
    assert process_cpu.diff({"a": 3.0}, {"a": 1.0}) == {"a": 2.0}
