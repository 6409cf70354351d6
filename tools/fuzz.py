"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis) against a live server.

Every operation in GET /openapi.json is called with schema-valid (positive) and schema-violating (negative)
inputs that Hypothesis generates from a fixed seed. Each response is checked: no 5xx, every 4xx carries the
`{"error": {"message", "type", "param", "code"}}` body, no error body shows a traceback or a file path; at
the end /health must still answer 200 and the engine must be idle (no running request, no cache block held).

  python tools/fuzz.py --url http://127.0.0.1:8000 --max-cases 5000 --max-seconds 900
  python tools/fuzz.py --start-server --max-cases 2000          # a tiny random model on a free port

tests/reliability/test_fuzz.py runs a bounded version of `run_fuzz` in the test suite.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import requests

# Run as `python tools/fuzz.py`, sys.path starts at tools/: put the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Strings that would mean an error body leaks implementation details.
LEAK_MARKERS = ("Traceback", '.py"', ".py:", "/work/", "site-packages", 'File "')
ERROR_FIELDS = ("message", "type", "param", "code")


@dataclasses.dataclass
class FuzzFailure:
    operation: str
    mode: str
    status: int
    reason: str
    request: str  # a curl command that reproduces it
    body: str


@dataclasses.dataclass
class FuzzReport:
    num_cases: int = 0
    seconds: float = 0.0
    by_operation: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    by_status: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    failures: list[FuzzFailure] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # (operation, mode) with no generable case
    health_after: int = 0
    running_after: float = -1.0
    kv_usage_after: float = -1.0

    @property
    def ok(self) -> bool:
        return not self.failures and self.health_after == 200 and self.running_after == 0 \
            and self.kv_usage_after == 0

    def summary(self) -> str:
        lines = [f"fuzzed {self.num_cases} cases in {self.seconds:.1f} s; failures: {len(self.failures)}",
                 "by operation: " + ", ".join(f"{k}={v}" for k, v in sorted(self.by_operation.items())),
                 "by status: " + ", ".join(f"{k}={v}" for k, v in sorted(self.by_status.items())),
                 f"after: /health {self.health_after}, running {self.running_after:g}, "
                 f"kv cache usage {self.kv_usage_after:g}"]
        if self.skipped:
            lines.append("no case could be generated for: " + ", ".join(self.skipped))
        for f in self.failures[:20]:
            lines.append(f"FAIL {f.operation} [{f.mode}] {f.status}: {f.reason}\n  {f.request}\n  -> {f.body[:300]}")
        return "\n".join(lines)


def check_response(status: int, body: bytes) -> str | None:
    """Why this response breaks the API's error contract, or None."""
    text = body.decode("utf-8", "replace")
    if status >= 500:
        return f"server error {status}"
    if status >= 400:
        try:
            payload = json.loads(text)
        except ValueError:
            return "4xx body is not JSON"
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict) or any(k not in error for k in ERROR_FIELDS):
            return f'4xx body is not {{"error": {{{", ".join(ERROR_FIELDS)}}}}}'
        if not isinstance(error["message"], str) or not error["message"]:
            return "4xx error.message is not a non-empty string"
        if error["code"] != status:
            return f"error.code {error['code']!r} differs from the status {status}"
        leaked = [m for m in LEAK_MARKERS if m in text]
        if leaked:
            return f"error body leaks implementation details: {leaked}"
    return None


def _metric(base_url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def wait_idle(base_url: str, timeout: float = 30.0) -> tuple[float, float]:
    """Wait until no request runs and no cache block is held; return (running, kv usage) as last seen."""
    deadline = time.monotonic() + timeout
    while True:
        running = _metric(base_url, "customllm_num_requests_running") + \
            _metric(base_url, "customllm_num_requests_waiting")
        usage = _metric(base_url, "customllm_kv_cache_usage_ratio")
        if (running == 0 and usage == 0) or time.monotonic() > deadline:
            return running, usage
        time.sleep(0.2)


def run_fuzz(base_url: str, *, max_cases: int = 300, max_seconds: float = 60.0, seed: int = 0,
             timeout: float = 30.0, headers: dict[str, str] | None = None,
             on_case: Callable[[str, str, int], None] | None = None) -> FuzzReport:
    """Fuzz every operation of the server's schema, positive then negative, within the case and time budgets.

    Hypothesis generates from `seed`, so the same server code gets the same cases. The case budget is shared
    out as the run goes: operations with few distinct inputs (GET without parameters) leave theirs to the rest.
    """
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.core.result import Err

    spec = httpx.get(base_url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    report = FuzzReport()
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation the schema describes too badly to generate for is a finding
            report.failures.append(FuzzFailure("schema", "-", 0, f"invalid operation: {result.err()}", "", ""))
        else:
            operations.append(result.ok())
    # Parameterless GETs first: they use one or two cases and hand the rest of the budget on.
    operations.sort(key=lambda op: (op.method.upper() != "GET", op.path))
    slots = [(op, mode) for op in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    start = time.monotonic()
    session = requests.Session()

    for i, (operation, mode) in enumerate(slots):
        budget = (max_cases - report.num_cases) // (len(slots) - i)
        if budget > 0 and time.monotonic() - start < max_seconds:
            _fuzz_operation(operation, mode, base_url, report, session, budget=budget, max_cases=max_cases,
                            deadline=start + max_seconds, seed=seed, timeout=timeout, headers=headers,
                            on_case=on_case)
    report.seconds = time.monotonic() - start
    report.health_after = httpx.get(base_url + "/health", timeout=30).status_code
    report.running_after, report.kv_usage_after = wait_idle(base_url)
    return report


def _fuzz_operation(operation: Any, mode: Any, base_url: str, report: FuzzReport, session: requests.Session, *,
                    budget: int, max_cases: int, deadline: float, seed: int, timeout: float,
                    headers: dict[str, str] | None, on_case: Callable[[str, str, int], None] | None) -> None:
    """Up to `budget` cases of one operation in one generation mode (positive or negative)."""
    import hypothesis

    label = f"{operation.method.upper()} {operation.path}"
    try:
        strategy = operation.as_strategy(generation_mode=mode)
    except Exception as exc:  # schemathesis cannot negate an operation without inputs
        report.skipped.append(f"{label} [{mode.value}]: {type(exc).__name__}")
        return

    @hypothesis.seed(seed)
    @hypothesis.settings(max_examples=budget, database=None, deadline=None, derandomize=False,
                         suppress_health_check=list(hypothesis.HealthCheck),
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                         verbosity=hypothesis.Verbosity.quiet)
    @hypothesis.given(case=strategy)
    def call(case: Any) -> None:
        if report.num_cases >= max_cases or time.monotonic() > deadline:
            return  # out of budget: let Hypothesis run out its examples without sending them
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=timeout)
        report.num_cases += 1
        report.by_operation[label] += 1
        report.by_status[response.status_code] += 1
        reason = check_response(response.status_code, response.content)
        if reason is not None:
            report.failures.append(FuzzFailure(label, mode.value, response.status_code, reason,
                                               case.as_curl_command(headers=headers),
                                               response.content.decode("utf-8", "replace")))
        if on_case is not None:
            on_case(label, mode.value, response.status_code)

    try:
        call()
    except hypothesis.errors.Unsatisfiable:
        report.skipped.append(f"{label} [{mode.value}]: unsatisfiable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server to fuzz (loopback only)")
    parser.add_argument("--start-server", action="store_true",
                        help="start `python -m server` on a free loopback port (tiny random model unless --model)")
    parser.add_argument("--model", default=None, help="with --start-server: checkpoint to serve")
    parser.add_argument("--max-model-len", type=int, default=128,
                        help="with --start-server: keeps generated requests short")
    parser.add_argument("--max-cases", type=int, default=2000)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="sent as a bearer token")
    parser.add_argument("--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None

    def on_case(label: str, mode: str, status: int) -> None:
        if args.verbose:
            print(f"{status} {label} [{mode}]", flush=True)

    def run(url: str) -> FuzzReport:
        report = run_fuzz(url, max_cases=args.max_cases, max_seconds=args.max_seconds, seed=args.seed,
                          headers=headers, on_case=on_case)
        print(report.summary())
        return report

    if args.start_server:
        from bench.local_server import local_server
        with local_server(args.model, ["--max-model-len", str(args.max_model_len)]) as server:
            report = run(server.url)
    else:
        report = run(args.url)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
