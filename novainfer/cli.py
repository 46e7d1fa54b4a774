"""The `novainfer` command: `serve` the OpenAI API, or `generate` offline."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shared.config import add_config_args, config_from_args
from shared.log_setup import setup_logging
from shared.protocol import SamplingParams


def _serve(args: argparse.Namespace) -> int:
    from novainfer.launcher import serve

    if args.model_pos:
        args.model = args.model_pos
    config = config_from_args(args)
    setup_logging(config, "launcher")
    return serve(config)


def _generate(args: argparse.Namespace) -> int:
    from novainfer.llm import LLM

    if args.model_pos:
        args.model = args.model_pos
    config = config_from_args(args)
    setup_logging(config, "generate", level=None if args.verbose else "WARNING")
    llm = LLM(config=config.engine)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.sampling_seed
    )
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.raw:
        results = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    else:
        results = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=len(prompts) > 1)
    for prompt, result in zip(prompts, results, strict=True):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(result.outputs[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="novainfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server (all processes)")
    serve.add_argument("model_pos", nargs="?", metavar="MODEL", help="model (default: the bundled SmolLM2)")
    add_config_args(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="generate offline, in this process")
    gen.add_argument("model_pos", nargs="?", metavar="MODEL", help="model (default: the bundled SmolLM2)")
    gen.add_argument("--prompt", action="append", help="prompt (repeatable); default: one per line of stdin")
    gen.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--verbose", action="store_true")
    add_config_args(gen)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
