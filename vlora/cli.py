"""`vlora` command line: tiny-model | demo-data | pack | train.

Each subcommand is a thin wrapper; bad input ends in one line `vlora: error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlora.errors import VloraError


def cmd_tiny_model(args) -> int:
    from vlora.tiny import build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed)
    print(f"tiny Qwen2.5-VL written to {out}")
    return 0


def cmd_demo_data(args) -> int:
    from vlora.data.synth import write_demo_data

    counts = write_demo_data(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    print(f"demo data written to {args.out}: {counts}")
    return 0


def cmd_pack(args) -> int:
    from vlora.data.pack import format_summary, pack

    summary = pack(args.src, args.out, image_root=args.image_root, shard_size=args.shard_size)
    print(format_summary(summary))
    return 0


def cmd_train(args) -> int:
    from vlora.train import main as train_main

    return train_main((["--config", args.config] if args.config else []) + args.overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlora", description="QLoRA fine-tuning for vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-model", help="build the tiny local Qwen2.5-VL used by the demo and the tests")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny_model)

    d = sub.add_parser("demo-data", help="write the synthetic demo images and annotation files")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--n-train", type=int, default=2048)
    d.add_argument("--n-val", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo_data)

    k = sub.add_parser("pack", help="pack an annotation file and its images into WebDataset shards")
    k.add_argument("--src", required=True, type=Path, help="annotation file (.json or .jsonl)")
    k.add_argument("--out", required=True, type=Path, help="shard folder to write (e.g. shards/NAME/train)")
    k.add_argument("--image-root", type=Path, default=None, help="resolve image paths here, not beside --src")
    k.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    k.set_defaults(func=cmd_pack)

    r = sub.add_parser("train", help="train in this process (use torchrun train.py for several)")
    r.add_argument("--config")
    r.add_argument("overrides", nargs="*")
    r.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VloraError as e:
        print(f"vlora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
