"""Int8-activation probe: tables for the notes from
benchmarks/results/int8_activations_20261203/bench_{1,2}t.json and the verify step cost
measured on main (benchmarks/results/verify_step_cost_zen4.json, 2 threads, context 500):
per-layer and x30 times, the cost of an extra row, and the step cost projected by replacing the
linear layers' time by the prototype's.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/int8_activations/report.py \
        [--verify benchmarks/results/verify_step_cost_zen4.json]
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results", "int8_activations_20261203")


def load(threads: int) -> dict | None:
    path = os.path.join(RESULTS, f"bench_{threads}t.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def print_projection(verify_path: str, title: str, labels: tuple[str, str], ms: dict[str, tuple[float, float]]) -> None:
    """The verify step's cost with its linear time reduced by what the probe saves: ms maps rows to
    (current, VNNI) linear ms for the 30 layers."""
    with open(verify_path) as f:
        verify = json.load(f)
    print(f"\n### {title}\n")
    print(
        f"| rows | execute ms | linear ms | {labels[0]} | {labels[1]} | projected linear | "
        "projected execute | x plain decode now | x plain decode projected |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_now = base_proj = None
    for point in verify["points"]:
        m = str(point["rows"])
        if m not in ms:
            continue
        ex, lin = point["median_ms"]["execute"], point["median_ms"]["linear"]
        cur, vn = ms[m]
        proj = ex - (cur - vn)
        if base_now is None or base_proj is None:
            base_now, base_proj = ex, proj
        print(
            f"| {m} | {ex:.2f} | {lin:.2f} | {cur:.2f} | {vn:.2f} | {lin - (cur - vn):.2f} | {proj:.2f} | "
            f"{ex / base_now:.2f} | {proj / base_proj:.2f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--verify", default="benchmarks/results/verify_step_cost_zen4.json")
    args = p.parse_args()
    by_threads = {t: d for t in (1, 2) if (d := load(t)) is not None}
    for t, d in by_threads.items():
        clock = d["main_clock"]
        print(f"\n### {t} thread(s), {clock} clock, {d['rounds']} rounds, {d['started_at']} - {d['ended_at']}")
        print(f"plans (R, J, variant, prefetch) by rows: {d['vnni_plan_by_rows']}")
        for g, layer in d["layer_us"].items():
            rows = sorted(layer, key=int)
            print(f"\n{g} layer ({'q, k, v, o, gate, up, down' if g == 'separate' else 'qkv, o, gate_up, down'}):\n")
            print("| rows | current us/layer | VNNI us/layer | current x30 ms | VNNI x30 ms | current/VNNI |")
            print("|---:|---:|---:|---:|---:|---:|")
            for m in rows:
                c, v = layer[m]["current"][clock], layer[m]["vnni"][clock]
                print(f"| {m} | {c:.1f} | {v:.1f} | {c * 30 / 1e3:.2f} | {v * 30 / 1e3:.2f} | {c / v:.2f}x |")
            one = rows[0]
            print("\nextra row (x30, ms): ", end="")
            parts = []
            for m in rows[1:]:
                for kn in ("current", "vnni"):
                    extra = (layer[m][kn][clock] - layer[one][kn][clock]) / (int(m) - int(one)) * 30 / 1e3
                    parts.append(f"{kn} {one}->{m}: {extra:.3f}")
            print("; ".join(parts))
            if t == 1:
                print("thread CPU vs wall at 1 thread (fused, current/vnni, us):", end=" ")
                print(
                    "; ".join(
                        f"{m}: {layer[m]['current']['thread']:.0f}/{layer[m]['current']['wall']:.0f}, "
                        f"{layer[m]['vnni']['thread']:.0f}/{layer[m]['vnni']['wall']:.0f}"
                        for m in rows
                    )
                )
    model = {}
    for t in (1, 2):
        path = os.path.join(RESULTS, f"bench_model_{t}t_run1.json")
        if os.path.exists(path):
            with open(path) as f:
                model[t] = json.load(f)
    plan = "R3J4v2p0"
    for t, d in model.items():
        med = d["median_ms_per_pass"]
        rows = sorted(med, key=int)
        print(
            f"\n### whole 30-layer passes (30 distinct copies of qkv, o, gate_up, down: ~53 MB), {t} thread(s), "
            f"{d['clock']} clock, {d['rounds']} rounds, {d['started_at']} - {d['ended_at']}, VNNI plan {plan}\n"
        )
        print("| rows | current ms | VNNI ms | current/VNNI | extra row vs 1 row: current | VNNI |")
        print("|---:|---:|---:|---:|---:|---:|")
        for m in rows:
            c, v = med[m]["current"][d["clock"]], med[m][plan][d["clock"]]
            ec = (c - med[rows[0]]["current"][d["clock"]]) / max(int(m) - 1, 1)
            ev = (v - med[rows[0]][plan][d["clock"]]) / max(int(m) - 1, 1)
            extra = f"{ec:.3f} | {ev:.3f}" if m != rows[0] else "- | -"
            print(f"| {m} | {c:.2f} | {v:.2f} | {c / v:.2f}x | {extra} |")
    if 2 in model and os.path.exists(args.verify):
        med = model[2]["median_ms_per_pass"]
        print_projection(
            args.verify,
            "projected step cost from the whole-pass figures (2 threads; verify_step_cost_zen4.json)",
            ("pass current", "pass VNNI"),
            {m: (med[m]["current"]["wall"], med[m][plan]["wall"]) for m in med},
        )
    runs = []
    for name in sorted(os.listdir(os.path.join(RESULTS))):
        if name.startswith("bench_model_2t_"):
            with open(os.path.join(RESULTS, name)) as f:
                runs.append(json.load(f)["median_ms_per_pass"])
    if runs and os.path.exists(args.verify):
        with open(args.verify) as f:
            verify = json.load(f)
        print(
            f"\n### projection by ratio over {len(runs)} whole-pass runs at 2 threads: projected linear = the "
            f"engine's linear / (current / VNNI {plan}) (median ratio; range in brackets)\n"
        )
        print(
            "| rows | execute ms | linear ms | current/VNNI | projected linear | projected execute | "
            "x decode now | x decode projected |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        base_now = base_proj = None
        for point in verify["points"]:
            m = str(point["rows"])
            ratios = sorted(r[m]["current"]["wall"] / r[m][plan]["wall"] for r in runs if m in r)
            if not ratios:
                continue
            ratio = (
                ratios[len(ratios) // 2]
                if len(ratios) % 2
                else sum(ratios[len(ratios) // 2 - 1 : len(ratios) // 2 + 1]) / 2
            )
            ex, lin = point["median_ms"]["execute"], point["median_ms"]["linear"]
            proj = ex - lin + lin / ratio
            if base_now is None:
                base_now, base_proj = ex, proj
            print(
                f"| {m} | {ex:.2f} | {lin:.2f} | {ratio:.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}] | {lin / ratio:.2f} | "
                f"{proj:.2f} | {ex / base_now:.2f} | {proj / base_proj:.2f} |"
            )
    if 2 in by_threads and os.path.exists(args.verify):
        layer = by_threads[2]["layer_us"]["fused"]
        print_projection(
            args.verify,
            "projected step cost (2 threads, context 500; verify_step_cost_zen4.json's figures)",
            ("kernel current x30", "kernel VNNI x30"),
            {m: (layer[m]["current"]["wall"] * 30 / 1e3, layer[m]["vnni"]["wall"] * 30 / 1e3) for m in layer},
        )


if __name__ == "__main__":
    main()
