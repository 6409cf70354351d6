"""`make bench`: the roofline, the one-at-a-time baseline and the serving benchmark, side by side in one run.

Starts the server (seed model, random weights, bf16 on this CPU unless told otherwise) on 127.0.0.1, drives it at
several concurrencies with 64-token prompts and 64-token outputs (ignore_eos), runs the baseline on the same model
and dtype, and writes bench/results/<date>.json and .png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import baseline, roofline, serve  # noqa: E402
from bench.local_server import free_port, wait_healthy  # noqa: E402


def start_server(model: str | None, dtype: str, port: int, max_num_seqs: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--dtype", dtype, "--max-num-seqs",
           str(max_num_seqs), "--log-level", "warning"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", 300, interval=1)
    except RuntimeError as exc:
        proc.kill()
        raise SystemExit(f"server {exc}") from None
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--baseline-requests", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()

    print("== roofline ==", flush=True)
    roof = roofline.main(["--dtype", args.dtype, "--batches", args.concurrency, "--prompt-len", str(args.prompt_len),
                          "--output-len", str(args.output_len)])
    print("== baseline ==", flush=True)
    base = baseline.main(["--dtype", args.dtype, "--requests", str(args.baseline_requests), "--prompt-len",
                          str(args.prompt_len), "--output-len", str(args.output_len)] +
                         (["--model", args.model] if args.model else []))
    print("== serving ==", flush=True)
    port = free_port()
    levels = [int(c) for c in args.concurrency.split(",")]
    server = start_server(args.model, args.dtype, port, max(levels))
    try:
        report = serve.main(["--url", f"http://127.0.0.1:{port}", "--concurrency", args.concurrency,
                             "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)])
    finally:
        server.terminate()
        server.wait(timeout=60)
    summary = {"date": stamp, "dtype": args.dtype, "model": args.model or "seed (random weights)",
               "roofline": roof, "baseline": base, "serving": report,
               "speedup_vs_baseline": {str(r["concurrency"]): r["output_tok_per_s"] / base["output_tok_per_s"]
                                       for r in report["levels"]}}
    (out_dir / f"{stamp}.json").write_text(json.dumps(summary, indent=2))
    serve.plot(report["levels"], str(out_dir / f"{stamp}.png"), base["output_tok_per_s"])
    bound = roof["serving_bound_tok_per_s"]
    print(f"served output tok/s as a share of the serving bound ({bound:.0f} tok/s): "
          + ", ".join(f"{r['concurrency']}: {r['output_tok_per_s'] / bound:.0%}" for r in report["levels"]))
    print(f"baseline {base['output_tok_per_s']:.1f} tok/s; speed-up by concurrency: "
          + ", ".join(f"{c}: {s:.1f}x" for c, s in summary["speedup_vs_baseline"].items()))
    print(f"wrote {out_dir / (stamp + '.json')} and .png")


if __name__ == "__main__":
    main()
