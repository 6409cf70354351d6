#!/usr/bin/env bash
# One prepared check for a lent GPU machine; ends well inside 10 minutes (every part has its own time limit).
#
#   bash tools/gpu_check.sh RESULTS_DIR [--device cpu]
#
# Parts (each writes RESULTS_DIR/<part>.json and its log RESULTS_DIR/<part>.log):
#   a) tests      the model, kernel and engine tests, with CUDA visible (GPU-only tests run, Triton on the GPU)
#   b) equivalence  CPU float32 reference vs GPU bfloat16, teacher-forced logits (rel. error <= 1e-2, greedy
#                 agreement where the top-2 margin is clear)
#   c) graphs     CUDA graph replay vs the same static path run eagerly, and vs unpadded eager
#   d) engine     decode steps at batch 1..256, graphs on and off; the 256-sequence nano-vllm shape
#   e) serve      the HTTP server on the GPU, bench/serve.py at c=1 and c=256
# A summary is printed last. --device cpu is the dry run: a tiny model, every part in seconds (checks the plumbing).
#
# The GPU machine has torch (CUDA), Triton and Python 3.12 but not the web stack: the wheels come from
# tools/gpu/wheels/ (tools/gpu/fetch_wheels.sh fills it on a machine with PyPI; the device tool carries it:
# carry ["tools/gpu/wheels"]). They are installed with --no-index into a private folder on PYTHONPATH, so nothing
# of the machine's own Python changes. No weights travel: the model is drawn from a seed on the host.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:?usage: tools/gpu_check.sh RESULTS_DIR [--device cpu]}
DEVICE=cuda
if [ "${2:-}" = "--device" ]; then DEVICE=${3:?--device needs cpu or cuda}; fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
TINY=()
if [ "$DEVICE" = cpu ]; then TINY=(--tiny); fi

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }

# -- environment ------------------------------------------------------------------------------------
DEPS="$RESULTS/.deps"
missing=$("$PY" - <<'EOF'
import importlib.util
names = ["fastapi", "starlette", "uvicorn", "pydantic", "httpx", "prometheus_client", "tokenizers", "safetensors",
         "pytest", "ninja"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    if [ ! -d tools/gpu/wheels ]; then
        echo "gpu_check: missing $missing and no tools/gpu/wheels/; run tools/gpu/fetch_wheels.sh and carry it" >&2
        exit 2
    fi
    log "installing from tools/gpu/wheels: $missing"
    if ! "$PY" -m pip install -q --no-index --find-links tools/gpu/wheels --target "$DEPS" \
            -r tools/gpu/requirements.txt > "$RESULTS/pip.log" 2>&1; then
        # No pip (or it failed): a wheel is a zip of the installed files, so unpacking every one is an install
        # without console scripts, which nothing here needs.
        log "pip install failed (see pip.log); unpacking the wheels into $DEPS"
        for wheel in tools/gpu/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$DEPS" || exit 2; done
    fi
fi
export PYTHONPATH="$PWD${DEPS:+:$DEPS}"
"$PY" - > "$RESULTS/env.json" <<EOF
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device_arg": "$DEVICE", "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    info.update(gpu_memory_gib=round(total / 2**30, 1), capability=list(torch.cuda.get_device_capability()))
print(json.dumps(info))
EOF
log "environment: $(cat "$RESULTS/env.json")"
if [ "$DEVICE" = cuda ] && ! grep -q '"gpu": "' "$RESULTS/env.json"; then
    echo "gpu_check: no CUDA device visible" >&2
    exit 2
fi

# The limits add up to 550 s on the GPU (each part usually needs far less); the CPU dry run gets twice as long.
SCALE=1
if [ "$DEVICE" = cpu ]; then SCALE=2; fi
status=()
run_part() {  # name, time limit in seconds, command...
    local name=$1 limit=$(( $2 * SCALE ))
    shift 2
    log "$name (limit ${limit}s)"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    status+=("$name rc=$rc $(( $(date +%s) - t0 ))s")
    tail -n 3 "$RESULTS/$name.log"
}

# a) tests, in two runs so a time-out of the second loses nothing of the first: what runs on the GPU here (the
# CUDA-only tests, the Triton kernels compiled, the graph runner), then the rest of the model and engine tests.
GPU_TESTS=(tests/gpu tests/model/ops/test_triton_mla_decode.py tests/model/ops/test_moe_grouped.py
           tests/server/engine/test_cuda_graphs.py)
run_part tests 100 "$PY" -m pytest -q -rfE -p no:cacheprovider "${GPU_TESTS[@]}" --junitxml="$RESULTS/tests.xml"
run_part tests_rest 80 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/model tests/server/engine \
    "${GPU_TESTS[@]/#/--ignore=}" --junitxml="$RESULTS/tests_rest.xml"
# b) c) d)
run_part equivalence 70 "$PY" tools/gpu/check.py equivalence --out "$RESULTS" --device "$DEVICE" "${TINY[@]}"
run_part graphs 70 "$PY" tools/gpu/check.py graphs --out "$RESULTS" --device "$DEVICE" "${TINY[@]}"
run_part engine 130 "$PY" tools/gpu/check.py engine --out "$RESULTS" --device "$DEVICE" "${TINY[@]}"

# e) serving over HTTP: the real server on loopback, bench/serve.py at c=1 and c=256.
serve() {
    local port=8321
    local args=(--device "$DEVICE" --port "$port" --max-num-seqs 256 --max-num-batched-tokens 4096
                          --log-level warning)
    if [ "$DEVICE" = cpu ]; then  # the dry run serves the tests' tiny checkpoint (the seed model is slow on CPU)
        "$PY" -c "import sys; from pathlib import Path; from tests.server.live import write_tiny_checkpoint
write_tiny_checkpoint(Path(sys.argv[1]))" "$RESULTS/tiny-ckpt" || return 1
        args+=(--model "$RESULTS/tiny-ckpt" --dtype float32 --kv-cache-tokens 65536)
    fi
    "$PY" -m server "${args[@]}" > "$RESULTS/server.log" 2>&1 &
    local pid=$!
    local ok=0
    for _ in $(seq 1 120); do
        if "$PY" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/health').status_code != 200)" \
            2>/dev/null; then ok=1; break; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    local rc=1
    if [ "$ok" = 1 ]; then
        local lens=(--prompt-len 128 --output-len 128)
        if [ "$DEVICE" = cpu ]; then lens=(--prompt-len 8 --output-len 4 --num-requests 8); fi
        "$PY" bench/serve.py --url "http://127.0.0.1:$port" --concurrency 1,256 "${lens[@]}" \
            --json "$RESULTS/serve.json"
        rc=$?
        "$PY" -c "import httpx; print(httpx.get('http://127.0.0.1:$port/metrics').text)" 2>/dev/null \
            | grep -E "kv_cache|cache_config" > "$RESULTS/serve_metrics.txt" || true
    else
        echo "server did not become healthy; its log:"; tail -n 30 "$RESULTS/server.log"
    fi
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return $rc
}
export -f serve
export DEVICE RESULTS PY
run_part serve 100 bash -c serve

# -- summary (last) ---------------------------------------------------------------------------------
log "done"
"$PY" - "$RESULTS" "${status[@]}" <<'EOF'
import json, sys
from pathlib import Path
results, status = Path(sys.argv[1]), sys.argv[2:]
def load(name):
    p = results / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None
print("\n==== GPU check summary ====")
print("env:", json.dumps(load("env")))
for line in status:
    print("part", line)
for name in ("tests", "tests_rest"):
    log = results / f"{name}.log"
    if log.exists():
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        print(f"{name}: {lines[-1] if lines else '(empty log)'}")
eq = load("equivalence")
if eq:
    print(f"equivalence: rel error median {eq['median_relative_error']:.2e} p90 {eq['p90_relative_error']:.2e} "
          f"max {eq['max_relative_error']:.2e}, rows <= 1e-2: {eq['rows_within_1e-2']:.1%}; greedy agreement on "
          f"clear rows {eq['greedy_agreement_clear']} ({eq['clear_rows']}/{eq['rows']} rows), pass={eq['pass']}")
gr = load("graphs")
if gr:
    print(f"graphs: replay == static eager on every step: {gr['pass']} (cuda graphs: {gr['cuda_graphs']}); "
          f"max |diff| vs unpadded {max(s['max_abs_diff_vs_unpadded'] for s in gr['steps']):.3g}, "
          f"min greedy agreement {min(s['greedy_agreement_vs_unpadded'] for s in gr['steps']):.3f}")
en = load("engine")
if en:
    for row in en["decode"]:
        print(f"decode b={row['batch']:>3}: graphs {row['graphs_ms']:7.2f} ms ({row['graphs_tok_s']:9,.0f} tok/s)"
              f"  eager {row['eager_ms']:7.2f} ms ({row['eager_tok_s']:9,.0f} tok/s)")
    for run in en["nano_vllm"]:
        print(f"nano-vllm shape {'eager ' if run['enforce_eager'] else 'graphs'}: {run['output_tok_s']:,.0f} "
              f"output tok/s ({run['output_tokens']} tokens, {run['seconds']:.1f} s)")
sv = load("serve")
if sv:
    for lv in sv.get("levels", []):
        print(f"serve c={lv['concurrency']:>3}: {lv['output_tok_per_s']:,.0f} output tok/s, "
              f"ttft p50 {lv['ttft_s']['p50'] * 1e3:.1f} ms, itl p50 {lv['itl_s']['p50'] * 1e3:.2f} ms, "
              f"{lv['num_requests']} requests, {lv['failed']} failed")
EOF
