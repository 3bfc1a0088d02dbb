"""`vlora` command line: tiny-model | demo-data | pack | train | export | generate | serve | eval | bench.

Each subcommand is a thin wrapper; bad input ends in one line `vlora: error: ...` and exit status 2
(`pack` exits 1, naming its first rejects, when more records were rejected than `--max-reject` allows).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vlora import families
from vlora.errors import VloraError


def cmd_tiny_model(args) -> int:
    from vlora.tiny import build_tiny_model

    out = build_tiny_model(args.out, family=args.family, seed=args.seed)
    print(f"tiny {families.get(args.family).title} written to {out}")
    return 0


def cmd_demo_data(args) -> int:
    from vlora.data.synth import write_demo_data

    counts = write_demo_data(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    print(f"demo data written to {args.out}: {counts}")
    return 0


def cmd_pack(args) -> int:
    from vlora.data.pack import format_summary, pack, reject_report

    if not 0 <= args.max_reject <= 1:
        raise VloraError(f"--max-reject is a fraction of the records read, between 0 and 1; got {args.max_reject}")
    if args.max_tokens is None and args.model is not None:
        raise VloraError("--model is only used with --max-tokens; add --max-tokens T or drop --model")
    limits = {"max_image_pixels": args.max_image_pixels, "max_image_bytes": args.max_image_bytes}
    limits = {k: v for k, v in limits.items() if v is not None}  # not given: pack's defaults
    summary = pack(args.src, args.out, fmt=args.format, image_root=args.image_root, shard_size=args.shard_size,
                   workers=args.workers, max_tokens=args.max_tokens, model=args.model, min_pixels=args.min_pixels,
                   max_pixels=args.max_pixels, progress=sys.stderr.isatty(), confine=args.confine, boxes=args.boxes,
                   **limits)
    print(format_summary(summary))
    errors = reject_report(summary, args.max_reject)
    for line in errors:  # the shards stay written: the user inspects rejects.jsonl, then repacks or raises the limit
        print(f"vlora: error: {line}", file=sys.stderr)
    return 1 if errors else 0


def cmd_train(args) -> int:
    from vlora.train import main as train_main

    return train_main((["--config", args.config] if args.config else []) + args.overrides)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv` naming one of the commands defined here, only those (see below)."""
    p = argparse.ArgumentParser(prog="vlora", description="QLoRA fine-tuning for vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-model", help="build a tiny local Qwen-VL model (random weights) for the demo and tests")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--family", choices=families.NAMES, default=families.DEFAULT,
                   help=f"model family (default {families.DEFAULT})")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny_model)

    d = sub.add_parser("demo-data", help="write the synthetic demo images and annotation files")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--n-train", type=int, default=2048)
    d.add_argument("--n-val", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo_data)

    from vlora.data.formats import FORMATS
    k = sub.add_parser("pack", help="check annotation files and their images, and pack them into WebDataset shards")
    k.add_argument("--src", required=True, type=Path,
                   help="annotation file (.json or .jsonl), or a folder: every *.json / *.jsonl in it, recursively")
    k.add_argument("--out", required=True,
                   help="shard folder to write (e.g. shards/NAME/train), or s3://bucket/prefix, gs://bucket/prefix")
    k.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="annotation format (default: detected per file)")
    k.add_argument("--image-root", type=Path, default=None, help="resolve relative image paths here first, then beside the file")
    k.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    k.add_argument("--max-reject", type=float, default=0.0,
                   help="fraction of records that may be rejected before the exit status is 1 (shards are written anyway)")
    k.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-checking processes (output is the same for any number)")
    k.add_argument("--max-image-pixels", type=int, default=None, help="reject larger images (default: PIL's decompression-bomb limit, 89478485)")
    k.add_argument("--max-image-bytes", type=int, default=None, help="reject larger image files (default: 64 MiB, 67108864)")
    k.add_argument("--confine", action="store_true",
                   help="for annotation files from elsewhere: reject images that resolve (symlinks followed) outside --image-root "
                        "and the annotation file's folder, and take paths as written (no parent-folder or shorter-path fallback)")
    k.add_argument("--max-tokens", type=int, default=None, help="reject samples longer than this in training (needs --model)")
    k.add_argument("--model", type=Path, default=None, help="model folder whose processor counts the tokens")
    k.add_argument("--boxes", choices=families.BOX_MODES, default="original",
                   help="grounding boxes in the text: in the image's pixels (checked, converted per family in training; "
                        "default) or already in the model's convention (as_written: untouched, train with data.boxes=as_written)")
    # Not given: pack's defaults (vlora.data.pack.DEFAULT_MIN_PIXELS / DEFAULT_MAX_PIXELS, the run's defaults).
    k.add_argument("--min-pixels", type=int, default=None, help="the run's data.min_pixels (default: its default)")
    k.add_argument("--max-pixels", type=int, default=None, help="the run's data.max_pixels (default: its default)")
    k.set_defaults(func=cmd_pack)

    r = sub.add_parser("train", help="train in this process (use torchrun train.py for several)")
    r.add_argument("--config")
    r.add_argument("overrides", nargs="*")
    r.set_defaults(func=cmd_train)

    # What comes out of a run: each command's arguments live beside its code, whose modules import torch and
    # transformers (seconds). `vlora demo-data` and friends, defined above, need not wait for that.
    if argv and argv[0] in sub.choices:
        return p
    from vlora.bench import add_bench_parser
    from vlora.evaluate import add_eval_parser
    from vlora.export import add_export_parser
    from vlora.generate import add_generate_parser
    from vlora.serve import add_serve_parser

    add_export_parser(sub)
    add_generate_parser(sub)
    add_serve_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except VloraError as e:
        print(f"vlora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
