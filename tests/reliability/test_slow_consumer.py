"""A client that reads its stream very slowly neither slows the other streams nor makes the server buffer without
bound: the engine never waits for a consumer, and a consumer that falls behind gets its tokens coalesced."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx

from tests.server.live import LiveServer, live_server
from tests.server.sse import DONE, completion_text, finish_of, iter_sse

NORMAL_STREAMS = 4
NORMAL_TOKENS = 120
SLOW_TOKENS = 400
ROUNDS = 3
# Loopback TCP grows a socket's send buffer to megabytes, which would absorb a whole slow stream; a fixed small
# one (inherited by accepted connections from the listening socket) makes the server feel the slow reader.
SERVER_SNDBUF = 8192


class _Throttled:
    """A streaming response whose bytes are read slowly (one small read per `pause`) until `fast` is set."""

    def __init__(self, response: httpx.Response, pause: float, fast: threading.Event) -> None:
        self.response, self.pause, self.fast = response, pause, fast
        self.num_slow_reads = 0

    def iter_bytes(self) -> Iterator[bytes]:
        for chunk in self.response.iter_raw(1024):
            yield chunk
            if not self.fast.is_set():
                self.num_slow_reads += 1
                time.sleep(self.pause)


def _normal_stream(base_url: str, prompt: list[int], rates: list[float]) -> None:
    body = {"prompt": prompt, "max_tokens": NORMAL_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    times: list[float] = []
    tokens = 0
    with httpx.Client(base_url=base_url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        for event in iter_sse(reply):
            if event == DONE:
                break
            chunk = json.loads(event)
            if chunk["choices"]:
                times.append(time.monotonic())
                tokens = chunk["usage"]["completion_tokens"]
    assert tokens == NORMAL_TOKENS
    rates.append((tokens - 1) / (times[-1] - times[0]))  # decode rate: tokens after the first, per second


def _normal_rate(server: LiveServer) -> float:
    """Median decode tokens/s of NORMAL_STREAMS concurrent streams."""
    rates: list[float] = []
    threads = [threading.Thread(target=_normal_stream, args=(server.base_url, [100 + i, 7, 8, 9], rates))
               for i in range(NORMAL_STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(rates) == NORMAL_STREAMS
    return statistics.median(rates)


def _slow_stream(base_url: str, body: dict[str, Any], fast: threading.Event, started: threading.Event,
                 result: dict[str, Any]) -> None:
    # A small receive buffer too, so the client's kernel cannot absorb the stream either.
    transport = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    with httpx.Client(base_url=base_url, timeout=120, transport=transport) as client, \
            client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        started.set()
        throttled = _Throttled(reply, 0.5, fast)
        result["events"] = list(iter_sse(cast(httpx.Response, throttled)))
        result["slow_reads"] = throttled.num_slow_reads


def test_slow_reader_does_not_slow_others_and_is_coalesced(tiny_checkpoint: Path) -> None:
    with live_server(tiny_checkpoint, max_num_seqs=16) as server, server.client() as client:
        for listener in server.server.servers:
            for sock in listener.sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SNDBUF)
        # top-20 logprobs make each token's chunk ~1 KB, far more than the socket buffers hold.
        slow_body = {"prompt": [3, 1, 4, 1, 5], "max_tokens": SLOW_TOKENS, "temperature": 0, "ignore_eos": True,
                     "logprobs": 20}
        solo = client.post("/v1/completions", json=slow_body).json()["choices"][0]
        _normal_rate(server)  # warm-up
        # Best of three: other work on the machine can only slow a round down, so the fastest round is the
        # closest to the undisturbed rate, with or without the slow reader.
        baseline = max(_normal_rate(server) for _ in range(ROUNDS))

        fast, started = threading.Event(), threading.Event()
        result: dict[str, Any] = {}
        slow = threading.Thread(target=_slow_stream, args=(server.base_url, slow_body | {"stream": True}, fast,
                                                           started, result))
        slow.start()
        try:
            assert started.wait(30)
            time.sleep(1.0)  # let the slow stream fill every buffer between the engine and the reader
            pending_max = 0
            stop_sampling = threading.Event()

            def sample_pending() -> None:
                # The engine-side buffer of the slow request: one merged output per sample, whatever its lag.
                nonlocal pending_max
                while not stop_sampling.is_set():
                    for seq in list(server.engine.scheduler.running):
                        stream = server.engine._streams.get(seq.seq_id)
                        if stream is None:
                            continue  # finished since the list was taken
                        pending = stream._pending
                        assert len(pending) <= stream.n
                        pending_max = max(pending_max, sum(len(o.token_ids) for o in list(pending.values())))
                    time.sleep(0.02)
            sampler = threading.Thread(target=sample_pending)
            sampler.start()
            with_slow = max(_normal_rate(server) for _ in range(ROUNDS))
            stop_sampling.set()
            sampler.join()
        finally:
            fast.set()
            slow.join(timeout=120)

        assert with_slow >= 0.7 * baseline, f"{with_slow:.1f} tok/s with a slow reader, {baseline:.1f} without"
        events = result["events"]
        assert events[-1] == DONE and result["slow_reads"] >= 5
        chunks = [json.loads(e) for e in events[:-1]]
        # The slow request still completes, with exactly the text and token count of a normal run ...
        assert completion_text(chunks) == solo["text"]
        assert finish_of(chunks) == ("length", None)
        assert sum(len(c["logprobs"]["tokens"]) for ch in chunks for c in ch["choices"]) == SLOW_TOKENS
        # ... but its tokens were merged while it lagged (far fewer events than tokens), so what the server held
        # for it was one growing output, not a queue of per-step events.
        assert len(chunks) < SLOW_TOKENS / 2, f"{len(chunks)} events for {SLOW_TOKENS} tokens: nothing coalesced"
        assert pending_max > 10
