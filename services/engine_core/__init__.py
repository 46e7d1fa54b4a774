"""The engine core: scheduler, paged KV cache, model runner, sampler.

MKL's strict conditional numerical reproducibility (CNR) mode makes its float32 GEMM compute
each output row the same way whatever the number of rows, which the exact mode's batch
invariance needs (run_mode.py); the bf16/int4/int8 kernels of the default mode do not go
through MKL's GEMM. MKL reads the setting once, when torch first loads it, so it is set
here, before anything of the engine imports torch. A user's own MKL_CBWR wins.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
