"""LoRA on an embedding table: fastpeft.LoRAEmbedding against peft's lora.Embedding layer, fwd+bwd.

    python bench/embedding_lora.py [--vocab 32000] [--dim 2048] [--tokens 2048] [--r 16] [--rounds 15] [--threads T]

The rows are fastpeft.tools.layer_rows.embedding_rows (also printed by ``fastpeft bench`` under
"Other layers"): both layers hold the same table and factors, each round times one fwd (no grad)
and one fwd+bwd of each, interleaved; medians, the ratio to peft, and the error against float64.
"""
from __future__ import annotations

import argparse

import torch

from fastpeft.tools.layer_rows import embedding_rows, format_layer_rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(format_layer_rows(embedding_rows(args.vocab, args.dim, args.tokens, args.r, args.rounds)))


if __name__ == "__main__":
    main()
