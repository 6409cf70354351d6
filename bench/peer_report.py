"""The peer comparison's summary (bench/peer.py): per concurrency, each run's output tok/s and TTFT p50, the best
vLLM set-up, and this server's ratios to the peers; as rows for the JSON, a table and a plot.

Run on its own, it prints the table again from a peer run's JSON (or from the partial.json of a run cut short)
and can draw its plot.

  python bench/peer_report.py bench/results/peer-<date>.json [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# Runs other than vLLM's set-ups (which are named vllm-<set-up>): results key -> (summary column prefix, label).
NAMED_RUNS = {"customllm": ("customllm", "this server"), "customllm-int8": ("customllm_int8", "this server, int8"),
              "llama.cpp-bf16": ("llama_cpp_bf16", "llama.cpp bf16"),
              "llama.cpp-q8_0": ("llama_cpp_q8_0", "llama.cpp Q8_0")}
# This server's ratio to a peer: (summary key, our column, the peer's column, label).
RATIOS = (("ratio_vs_llama_cpp", "customllm", "llama_cpp_bf16", "vs llama.cpp"),
          ("ratio_int8_vs_llama_cpp_q8_0", "customllm_int8", "llama_cpp_q8_0", "int8 vs Q8_0"))


def runs(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(results key, column prefix, label) of each run in `results`: this server first, then vLLM, llama.cpp."""
    known = NAMED_RUNS | {k: (f"vllm_{k[5:]}", f"vLLM {k[5:]}") for k in results if k.startswith("vllm-")}
    order = ["customllm", "customllm-int8", *(k for k in results if k.startswith("vllm-")), "llama.cpp-bf16",
             "llama.cpp-q8_0"]
    return [(k, *known[k]) for k in order if k in results]


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per concurrency: `<column>_tok_s` and `<column>_ttft_p50` of every run that
    measured that level, `vllm_best_setup`, and the ratios of this server's tok/s to the peers'."""
    rows = []
    for conc in sorted({level["concurrency"] for run in results.values() for level in run.get("levels", [])}):
        row: dict[str, Any] = {"concurrency": conc}
        for key, column, _ in runs(results):
            level = next((r for r in results[key].get("levels", []) if r["concurrency"] == conc), None)
            if level is not None:
                row[f"{column}_tok_s"] = level["output_tok_per_s"]
                row[f"{column}_ttft_p50"] = level["ttft_s"]["p50"]
        vllm = [c for c in row if c.startswith("vllm_") and c.endswith("_tok_s")]
        if vllm and "customllm_tok_s" in row:
            best = max(vllm, key=lambda c: row[c])
            row["vllm_best_setup"] = best.removeprefix("vllm_").removesuffix("_tok_s")
            row["ratio_vs_vllm_best"] = row["customllm_tok_s"] / row[best]
        for key, ours, peer, _ in RATIOS:
            if f"{ours}_tok_s" in row and f"{peer}_tok_s" in row:
                row[key] = row[f"{ours}_tok_s"] / row[f"{peer}_tok_s"]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], results: dict[str, Any]) -> str:
    columns = [(column, label) for _, column, label in runs(results) if any(f"{column}_tok_s" in r for r in rows)]
    ratios = [("ratio_vs_vllm_best", "vs vLLM best")] + [(key, label) for key, _, _, label in RATIOS]
    ratios = [(key, label) for key, label in ratios if any(key in r for r in rows)]
    lines = [f"{'conc':>5} | " + " | ".join(f"{label:>22}" for _, label in columns)
             + "".join(f" | {label:>12}" for _, label in ratios)]
    for row in rows:
        cells = [f"{row[f'{c}_tok_s']:7.1f} tok/s {row[f'{c}_ttft_p50']:6.2f} s" if f"{c}_tok_s" in row
                 else f"{'n/a':>22}" for c, _ in columns]
        cells += [f"{f'{row[key]:.2f}x' if key in row else 'n/a':>12}" for key, _ in ratios]
        lines.append(f"{row['concurrency']:>5} | " + " | ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for _, column, label in runs(results):
        if all(f"{column}_tok_s" in r for r in rows):
            left.plot(conc, [r[f"{column}_tok_s"] for r in rows], "o-", label=label)
            right.plot(conc, [r[f"{column}_ttft_p50"] for r in rows], "o-", label=label)
    left.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="Throughput (64 in, 64 out)")
    right.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="seconds", title="TTFT p50")
    for ax in (left, right):
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a peer run's JSON (its `runs`), or a run's partial.json")
    parser.add_argument("--plot", default=None, help="write the plot here")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    results = data.get("runs", data)
    rows = summarise(results)
    print(format_table(rows, results))
    if args.plot:
        plot(rows, results, Path(args.plot))


if __name__ == "__main__":
    main()
