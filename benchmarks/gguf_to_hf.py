"""Write a GGUF checkpoint (default: the bundled SmolLM2-135M-Instruct) as a Hugging Face
directory of bf16 safetensors, with its tokenizer: a float checkpoint of a real model's shape
for the benchmarks, where the bundled Q4_1 file would take the int4 path (the engine keeps a
float checkpoint's dense weights: README, "Fused CPU decode"). transformers dequantizes the
file's 4-bit weights; the result is as any bf16 Hugging Face download of the model would be.

    .venv/bin/python benchmarks/gguf_to_hf.py /tmp/smollm2-bf16
    .venv/bin/python benchmarks/roofline.py --model /tmp/smollm2-bf16 --modes default default-eager
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shared.model_files import resolve_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="the directory to write")
    p.add_argument("--gguf", default="smollm2", help="a GGUF file, or a bundled model's name")
    args = p.parse_args()
    path = resolve_model(args.gguf).path
    where, name = os.path.dirname(path), os.path.basename(path)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.bfloat16)
    # transformers will not save a model it loaded from GGUF: a plain one of the same config does.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(where, gguf_file=name), dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(args.output)
    print(f"wrote {args.output} ({model.num_parameters() / 1e6:.0f}M parameters, bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
