"""Draw the NovaInfer Grafana dashboard's main panels from a real Prometheus.

Grafana is not installable here, so this starts `novainfer serve`, Debian's `prometheus`
with the shipped config and rules (scraping every second), drives the server with
serve_bench.py's shared-prefix workload, then asks Prometheus' query_range API for the
dashboard's own queries (deploy/grafana/dashboards/novainfer.json, Grafana's variables
expanded) over the run and plots them with matplotlib into docs/img/dashboard.png.

    .venv/bin/python benchmarks/dashboard_picture.py --duration-s 90 --concurrency 4

Needs `apt-get install prometheus` and the bench extra (matplotlib).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.deploy.live_prometheus import api, dashboard_queries, run_prometheus  # noqa: E402 - needs ROOT on sys.path
from tests.e2e.conftest import free_port, start_server  # noqa: E402 - needs ROOT on sys.path

PANELS = [
    "Requests/s by status",
    "Time to first token",
    "Inter-token latency",
    "Tokens/s",
    "Requests running / waiting",
    "KV-cache usage",
    "Prefix-cache hit rate",
    "Engine step time",
    "Engine batch size",
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=90.0, help="length of the load")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--system-prompt-len", type=int, default=80, help="words of each shared system prompt")
    p.add_argument("--output-len", default="16:48", help="tokens, LO:HI")
    p.add_argument("--output", default=str(ROOT / "docs" / "img" / "dashboard.png"))
    p.add_argument("--serve-args", default="", help="extra flags for novainfer serve")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(tmp, *args.serve_args.split())
        try:
            with run_prometheus(Path(tmp), f"127.0.0.1:{server.port}", free_port()) as prom:
                start = time.time()
                subprocess.run(
                    [
                        sys.executable,
                        str(ROOT / "benchmarks" / "serve_bench.py"),
                        "--base-url",
                        server.base_url,
                        "--workload",
                        "shared-prefix",
                        "--num-requests",
                        "1000",
                        "--concurrency",
                        str(args.concurrency),
                        "--output-len",
                        args.output_len,
                        "--system-prompt-len",
                        str(args.system_prompt_len),
                        "--max-duration-s",
                        str(args.duration_s),
                    ],
                    check=True,
                )
                time.sleep(3)
                end = time.time()
                series: dict[str, list[tuple[str, list[tuple[float, float]]]]] = {}
                for title, legend, expr in dashboard_queries():
                    if title not in PANELS:
                        continue
                    data = api(prom, "query_range", query=expr, start=start, end=end, step=2)
                    for result in data["result"]:
                        label = legend
                        for key, value in result["metric"].items():
                            label = label.replace("{{" + key + "}}", value)
                        points = [(float(t) - start, float(v)) for t, v in result["values"]]
                        series.setdefault(title, []).append((label, points))
        finally:
            server.stop()

    fig, axes = plt.subplots(3, 3, figsize=(15, 10))
    for ax, title in zip(axes.flat, PANELS, strict=True):
        for label, points in series.get(title, []):
            ax.plot([t for t, _ in points], [v for _, v in points], label=label)
        ax.set_title(title)
        ax.set_xlabel("s since the load started")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"NovaInfer dashboard panels from Prometheus query_range: shared-prefix load, {args.concurrency} "
        f"conversations, {args.duration_s:.0f} s, SmolLM2-135M on CPU"
    )
    fig.tight_layout()
    fig.savefig(args.output, dpi=90)
    print("wrote", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
