"""llama.cpp's `llama-server` as a peer of `make bench-peer`: built once from source, cached, with the peer GGUFs.

The source is the llama.cpp tree that PyPI's llama-cpp-python sdist vendors (`pip download`, then only the native
server is built, with cmake, for this CPU: GGML_NATIVE). The binary is cached under
<cache>/llama-server-<version>-<cpu key> (the key hashes /proc/cpuinfo's flags: -march=native code must not run on
another CPU), and the GGUFs of bench/peer/config.json (bench/peer_gguf.py, bf16 and Q8_0) under <cache>/peer-gguf,
keyed by the config and the writer. cmake comes from PATH, else from a venv of its own under the cache. Nothing
here is a dependency of this package; <cache> is $CUSTOMLLM_BENCH_CACHE or ~/.cache/customllm-bench.

`--check` starts llama-server on the bf16 GGUF, generates 64 tokens (ignore_eos) for a 64-token prompt and prints
its own timings and its KV cache's bytes per token, to show the model loads and runs at a plausible speed.

  python bench/peer_llama.py [--weights bf16,q8_0] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx

# Run as `python bench/peer_llama.py`, sys.path starts at bench/: put the repository root first.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.local_server import free_port, stop, wait_started  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # vendors llama.cpp at commit 0c1e570
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF"]  # static: the cached binary stands alone


def cpu_key() -> str:
    """A short hash of this CPU's feature flags: a GGML_NATIVE build is only reused on the same ISA."""
    text = Path("/proc/cpuinfo").read_text()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12]


def run_logged(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        if subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed; see {log}")


def ensure_source(cache: Path, log: Path) -> Path:
    """The llama.cpp tree vendored by the llama-cpp-python sdist, downloaded and unpacked once."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    tree = cache / name / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    sdist = cache / f"{name}.tar.gz"
    if not sdist.exists():
        print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (once; log: {log})", flush=True)
        run_logged([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(cache)], log)
    with tarfile.open(sdist) as archive:
        archive.extractall(cache, filter="data")
    if not (tree / "CMakeLists.txt").exists():
        raise RuntimeError(f"{sdist} holds no vendor/llama.cpp")
    return tree


def find_cmake(cache: Path, log: Path) -> str:
    """cmake from PATH, else pip's cmake in a venv under the cache (never this project's)."""
    if (found := shutil.which("cmake")) is not None:
        return found
    venv = cache / "build-tools-venv"
    cmake = venv / "bin" / "cmake"
    if not cmake.exists():
        run_logged([sys.executable, "-m", "venv", str(venv)], log)
        run_logged([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "cmake"], log)
    return str(cmake)


def ensure_llama_server(cache: Path, log: Path) -> Path:
    """The cached llama-server binary for this CPU, building it first if needed (minutes)."""
    binary = cache / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-{cpu_key()}" / "llama-server"
    if binary.exists():
        return binary
    tree = ensure_source(cache, log)
    cmake = find_cmake(cache, log)
    build = tree / f"build-{cpu_key()}"
    nice = ["nice"] if shutil.which("nice") else []
    print(f"building llama-server in {build} (once per CPU, ~10 min on 2 cores; log: {log})", flush=True)
    run_logged([*nice, cmake, "-S", str(tree), "-B", str(build), *CMAKE_FLAGS], log)
    run_logged([*nice, cmake, "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)],
               log)
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "bin" / "llama-server", binary)
    shutil.rmtree(build)
    return binary


def ensure_gguf(cache: Path, tree: Path, weights: str, log: Path) -> Path:
    """The peer GGUF in `weights` (bf16 or q8_0), written once per peer config and writer."""
    digest = hashlib.sha1()
    for part in (ROOT / "bench" / "peer" / "config.json", ROOT / "server" / "tokenizer.json",
                 ROOT / "bench" / "peer_gguf.py"):
        digest.update(part.read_bytes())
    path = cache / "peer-gguf" / f"peer-{digest.hexdigest()[:10]}-{weights}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once; a minute or two)", flush=True)
        run_logged([sys.executable, str(ROOT / "bench" / "peer_gguf.py"), "--gguf-py", str(tree / "gguf-py"),
                    "--out", str(path), "--weights", weights], log)
    return path


def server_command(binary: Path, gguf: Path, port: int, parallel: int, ctx_size: int,
                   threads: int | None = None) -> list[str]:
    """llama-server with one slot per stream (each gets ctx_size / parallel, padded to 256), continuous batching,
    every CPU by default, no prompt cache in RAM (on by default: a peer that reuses prompts across requests would
    not be measuring the same work). Verbosity 4 logs the KV cache's size."""
    threads = threads or len(os.sched_getaffinity(0))
    return [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", "peer",
            "--parallel", str(parallel), "--cont-batching", "--ctx-size", str(ctx_size), "--threads", str(threads),
            "--cache-ram", "0", "--verbosity", "4"]


def kv_bytes_per_token(log_text: str) -> int | None:
    """From llama-server's start-up line `llama_kv_cache: size =  540.00 MiB (   256 cells,  30 layers, 64/64
    seqs), ...`: `cells` per stream, one stream per slot (the second figure)."""
    found = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +\d+ layers, +\d+/(\d+) seqs\)",
                      log_text)
    return round(float(found[1]) * 2**20 / (int(found[2]) * int(found[3]))) if found else None


def one_completion(url: str, prompt_len: int, output_len: int) -> dict[str, Any]:
    """One completion, not streamed, with ignore_eos: llama-server's reply, with its own `timings`."""
    body = {"prompt": list(range(100, 100 + prompt_len)), "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=600)
    reply.raise_for_status()
    result: dict[str, Any] = reply.json()
    return result


def check(binary: Path, gguf: Path, logs: Path, threads: int | None) -> None:
    """64 tokens in, 64 out on 64 slots; prints llama-server's own timings and its KV cache's bytes per token."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = logs / f"llama-server-check-{gguf.stem}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(server_command(binary, gguf, port, 64, 8192, threads), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_started(proc, url, 600, log)
        reply = one_completion(url, 64, 64)
    finally:
        stop(proc)
    usage, timings = reply["usage"], reply["timings"]
    print(f"{gguf.name}: {usage['completion_tokens']} tokens out for {usage['prompt_tokens']} in; prefill "
          f"{timings['prompt_per_token_ms']:.1f} ms/token, decode {timings['predicted_per_token_ms']:.1f} ms/token; "
          f"KV cache {kv_bytes_per_token(log.read_text())} bytes/token (log {log})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="bf16,q8_0", help="GGUFs to write: bf16, q8_0")
    parser.add_argument("--check", action="store_true", help="run each GGUF once and print llama-server's timings")
    parser.add_argument("--threads", type=int, default=None, help="llama-server's --threads (default: every CPU)")
    args = parser.parse_args(argv)
    from bench.peer import cache_dir  # the one place that says where the peers' cache is

    cache = cache_dir()
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    binary = ensure_llama_server(cache, logs / "llama-build.log")
    tree = ensure_source(cache, logs / "llama-build.log")
    print(f"llama-server: {binary}")
    for weights in args.weights.split(","):
        gguf = ensure_gguf(cache, tree, weights, logs / "llama-gguf.log")
        print(f"GGUF: {gguf} ({gguf.stat().st_size / 1e9:.2f} GB)")
        if args.check:
            check(binary, gguf, logs, args.threads)


if __name__ == "__main__":
    main()
