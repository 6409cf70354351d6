"""Constrained-decoding cost: the token-bitmask time per step at 64 constrained rows, and how much a sampler step
of 64 unconstrained rows slows down when 64 constrained rows share its batch.

    python bench/grammar_mask.py [--rows 64] [--steps 30] [--repeats 5]

Real tokenizer (49,152 tokens), a 5-field JSON schema, matchers advanced to different points of a valid output so
the rows differ. A/B variants alternate inside one run, best of --repeats (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# Run as `python bench/grammar_mask.py`, sys.path starts at bench/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine.grammar import BitmaskFiller, GrammarCompiler, GrammarSpec, apply_bitmask_
from server.engine.sampler import Sampler
from server.engine.sampler_state import SamplingState
from server.engine.sampling_params import SamplingParams
from server.tokenizer import load_tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string"}}, "active": {"type": "boolean"}},
    "required": ["name", "age", "role", "tags", "active"]}
TEXT = '{"name":"Ada Lovelace","age":36,"role":"admin","tags":["math","engines","poetry"],"active":true}'


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tok = load_tokenizer(None)
    vocab = tok.vocab_size
    compiler = GrammarCompiler(tok.to_json(), vocab, tok.eos_token_id)
    start = time.perf_counter()
    grammar = compiler.compile(GrammarSpec("json", json.dumps(SCHEMA)), "bench")
    print(f"compile (incl. tokenizer build): {time.perf_counter() - start:.3f} s; threads: {torch.get_num_threads()}")
    ids = tok.encode(TEXT)

    def matchers() -> list:
        out = []
        for r in range(args.rows):
            m = grammar.new_matcher()
            assert m.consume_tokens(ids[:r % (len(ids) - 1)])
            out.append(m)
        return out

    filler = BitmaskFiller()
    rows = matchers()
    filler.fill(rows, vocab)  # warm the lexers
    fill_best = apply_best = float("inf")
    for _ in range(args.repeats):
        logits = torch.randn(args.rows, vocab)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            bitmask = filler.fill(rows, vocab)
        t1 = time.perf_counter()
        for _ in range(args.steps):
            apply_bitmask_(logits, bitmask)
        t2 = time.perf_counter()
        fill_best = min(fill_best, (t1 - t0) / args.steps)
        apply_best = min(apply_best, (t2 - t1) / args.steps)
    print(f"mask per step at {args.rows} constrained rows: fill {fill_best * 1e3:.2f} ms "
          f"({fill_best * 1e6 / args.rows:.1f} us/row) + apply {apply_best * 1e3:.2f} ms")

    sampler = Sampler(seed=0)
    params = SamplingParams(temperature=1.0, seed=1)
    plain = [SamplingState(params) for _ in range(args.rows)]
    best = {"alone": float("inf"), "shared": float("inf")}
    for _ in range(args.repeats):
        for variant in ("alone", "shared"):  # alternated, so both see the same machine load
            states = plain if variant == "alone" else plain + [SamplingState(params, matcher=m) for m in matchers()]
            logits = torch.randn(len(states), vocab)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                sampler.sample(logits, states, [0] * len(states), tok.eos_token_id)
            best[variant] = min(best[variant], (time.perf_counter() - t0) / args.steps)
    print(f"sampler step, {args.rows} unconstrained rows alone: {best['alone'] * 1e3:.2f} ms; with {args.rows} "
          f"constrained rows in the batch: {best['shared'] * 1e3:.2f} ms "
          f"(x{best['shared'] / best['alone']:.2f}; the unconstrained rows' tokens are unchanged)")


if __name__ == "__main__":
    main()
