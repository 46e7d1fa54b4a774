#!/bin/bash
# Every timing of the int8-activation probe: run on a quiet machine, nothing else running.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD
py=.venv/bin/python
date -u
$py benchmarks/int8_activations/bench.py --plans --threads 1 --rounds 41
$py benchmarks/int8_activations/bench.py --plans --threads 2 --rounds 41
$py benchmarks/int8_activations/bench.py --threads 1 --rounds 201
$py benchmarks/int8_activations/bench.py --threads 2 --rounds 201
THREADS=2 $py benchmarks/int8_activations/repack_time.py
$py benchmarks/int8_activations/report.py | tee benchmarks/results/int8_activations_20261203/report.md
date -u
