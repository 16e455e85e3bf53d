"""`nanoseek tokenizer`: train a DeepSeek-style byte-level BPE on local files, or encode text with one.

    nanoseek tokenizer train data/*.jsonl --vocab-size 8192 --out runs/tok
    nanoseek tokenizer train --synthetic-docs 20000 --vocab-size 2048 --out runs/tok   # no data files needed
    nanoseek tokenizer encode runs/tok --text "Hello, world"
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from nanoseek.errors import NanoseekError

HELP = "train a byte-level BPE tokenizer with DeepSeek's special tokens, or encode/decode text with one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("train", help="train on .txt/.jsonl/.parquet files (field 'text')", description=(
        "Train a byte-level BPE with DeepSeek-V3's pre-tokenizer, special tokens and R1 chat template; "
        "writes tokenizer.json + tokenizer_config.json (loadable by transformers.AutoTokenizer)."),
        formatter_class=fmt)
    p.add_argument("files", nargs="*", metavar="FILES", help="data files or directories")
    p.add_argument("--vocab-size", type=int, default=8192, help="total ids, special tokens included")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--min-frequency", type=int, default=2, help="a merge must occur at least this often")
    p.add_argument("--field", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--synthetic-docs", type=int, default=0,
                   help="also train on this many generated documents (nanoseek.data.pretrain.synthetic_corpus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated documents")

    p = sub.add_parser("encode", help="print the ids of a text", formatter_class=fmt,
                       description="Encode text (from --text or stdin) and print the ids as JSON.")
    p.add_argument("dir", metavar="DIR", help="tokenizer or checkpoint directory")
    p.add_argument("--text", help="text to encode (default: read stdin)")
    p.add_argument("--bos", action="store_true", help="prepend the BOS token")
    p.add_argument("--tokens", action="store_true", help="print the token strings beside the ids")

    p = sub.add_parser("decode", help="print the text of ids", formatter_class=fmt,
                       description="Decode ids (JSON list or space-separated, from --ids or stdin).")
    p.add_argument("dir", metavar="DIR", help="tokenizer or checkpoint directory")
    p.add_argument("--ids", help="ids to decode (default: read stdin)")
    p.add_argument("--skip-special", action="store_true", help="drop special tokens from the text")


def run(args: argparse.Namespace) -> int:
    from nanoseek.tokenizer import Tokenizer

    if args.tokenizer_command == "train":
        return _train(args)
    tok = Tokenizer.from_dir(args.dir)
    if args.tokenizer_command == "encode":
        text = args.text if args.text is not None else sys.stdin.read()
        ids = tok.encode(text, add_bos=args.bos)
        if args.tokens:
            print(json.dumps([[i, tok.id_to_token(i)] for i in ids], ensure_ascii=False))
        else:
            print(json.dumps(ids))
        return 0
    raw = (args.ids if args.ids is not None else sys.stdin.read()).strip()
    try:
        ids = json.loads(raw) if raw.startswith("[") else [int(x) for x in raw.split()]
    except ValueError:
        raise NanoseekError(f"cannot read ids from {raw[:40]!r}: give a JSON list or space-separated integers") \
            from None
    print(tok.decode(ids, skip_special_tokens=args.skip_special))
    return 0


def _train(args: argparse.Namespace) -> int:
    from nanoseek.data.pretrain import expand_paths, synthetic_corpus
    from nanoseek.tokenizer import train_tokenizer

    if not args.files and not args.synthetic_docs:
        raise NanoseekError("no training text: give FILES or --synthetic-docs N")
    if args.files:
        files = expand_paths(args.files)   # fail on a bad path before the long part starts
        print(f"training on {len(files)} file(s)" + (f" + {args.synthetic_docs} generated documents"
                                                    if args.synthetic_docs else ""), file=sys.stderr)
    texts = synthetic_corpus(args.synthetic_docs, args.seed) if args.synthetic_docs else None
    t0 = time.time()
    # tokenizers draws its own progress bars on stderr while it counts pairs and merges.
    tok = train_tokenizer(args.files or None, args.vocab_size, args.out, texts=texts,
                          min_frequency=args.min_frequency, field=args.field, show_progress=True)
    print(f"trained {tok.vocab_size} ids in {time.time() - t0:.1f}s -> {args.out}")
    return 0
