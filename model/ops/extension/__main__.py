"""Build the CPU extension ahead of time (images, CI), for this CPU or for other ISA levels.

Usage: python -m model.ops.extension build [--isa native | avx2,avx512,avx512-bf16 | all]
Builds are compiled and linked only, never loaded (model/ops/cpu_extension.py explains the cache and the levels).
"""

from __future__ import annotations

import argparse
import logging

from model.ops import cpu_extension


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--isa", default="native",
                        help="comma-separated levels, 'all' (the serving levels), or 'native' (this CPU's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.isa == "native":
        native = cpu_extension.detect_isa()
        if native is None:
            raise SystemExit("this CPU lacks AVX2/FMA: nothing to build (the server uses its torch paths)")
        levels = [native]
    else:
        levels = list(cpu_extension.SERVING_ISAS) if args.isa == "all" else args.isa.split(",")
    known = cpu_extension.ISA_LEVELS
    unknown = [isa for isa in levels if isa not in known]
    if unknown:
        raise SystemExit(f"unknown ISA level(s) {unknown}; expected some of {list(known)}, 'all' or 'native'")
    for isa in levels:
        print(cpu_extension.build(isa))


if __name__ == "__main__":
    main()
