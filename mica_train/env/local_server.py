"""A deterministic OpenAI-compatible chat-completions server on 127.0.0.1, for tests,
benchmarks and smoke runs of the LLM simulators without a model.

    with LocalChatServer(latency=0.05) as server:
        env = make_env(EnvConfig(simulator="llm", base_url=server.url, model="local"))

Replies depend only on the request body, so a client gets the same answers whatever the order
or the concurrency of its requests:

- a judge request (system prompt ``JUDGE_SYSTEM_PROMPT``) gets a progress rubric from the acts
  of the reply it rates (``acts.detect_acts``): each act shown lifts its axis by level 2 when it
  is the only act, 1 otherwise; a reply showing no act gets ``A.Neg = -1``;
- any other request gets one of a few user messages, picked by a hash of the body.

``latency`` seconds are added to every request (a stand-in for a model's generation time).
HTTP/1.1 keep-alive is on; ``connections`` counts the connections accepted, ``max_in_flight``
the most requests handled at once.

Faults. ``faults`` maps a kind to the share of distinct request bodies that fail their first
``fail_attempts`` attempts (chosen by a hash of ``fault_seed`` and the body, so the faulty
requests are the same whatever the order of arrival): ``timeout`` (answers after
``timeout_delay`` seconds), ``http_500``, ``http_503``, ``malformed`` (a 200 whose body is
truncated JSON), ``bad_content`` (a chat completion whose content is not a rubric, or an empty
user message), ``close`` (closes the connection without answering). ``injected`` counts them.
Only loopback addresses are served; every request loop is bounded by the client.

As a process (``python -m mica_train.env.local_server --latency 0.05``) it prints its base
URL on the first line of stdout and serves until it is terminated; ``GET /stats`` returns the
counters as JSON.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FAULT_KINDS", "LocalChatServer", "rubric_for_reply"]

FAULT_KINDS = ("timeout", "http_500", "http_503", "malformed", "bad_content", "close")

_USER_MESSAGES = (
    "I still don't understand why this happened to me.",
    "I just feel so alone with all of this.",
    "I honestly don't know what to do next.",
    "It's hard to explain, but I'm scared it will get worse.",
    "Part of me knows it's not my fault, but it still hurts.",
    "I keep going over it again and again at night.",
)
_REPLY_TO_RATE = "Latest supporter reply to rate:\n"


def rubric_for_reply(reply):
    """The server's progress rubric for ``reply`` (module docstring)."""
    from .acts import ACT_AXIS, detect_acts
    from .rubric import PROGRESS_KEYS

    acts = detect_acts(reply)
    rubric = dict.fromkeys(PROGRESS_KEYS, 0)
    for act in acts:
        rubric[f"{ACT_AXIS[act]}.Prog"] = 2 if len(acts) == 1 else 1
    if not acts:
        rubric["A.Neg"] = -1
    return rubric


def _unit(*parts):
    """A number in [0, 1) from a hash of ``parts``."""
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def _completion(content):
    return json.dumps({"id": "local", "object": "chat.completion", "model": "local",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content}}]}
                      ).encode()


class LocalChatServer:
    """The server of the module docstring; ``start()`` / ``stop()`` or a ``with`` block."""

    def __init__(self, latency=0.0, *, faults=None, fault_seed=0, fail_attempts=1,
                 timeout_delay=2.0, host="127.0.0.1", port=0):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"LocalChatServer serves loopback addresses only, got {host!r}")
        faults = dict(faults or {})
        unknown = sorted(set(faults) - set(FAULT_KINDS))
        if unknown or sum(faults.values()) > 1 or any(r < 0 for r in faults.values()):
            raise ValueError(f"faults: kinds from {FAULT_KINDS} with shares summing to <= 1, "
                             f"got {faults}")
        self.latency = float(latency)
        self.faults = faults
        self.fault_seed = fault_seed
        self.fail_attempts = int(fail_attempts)
        self.timeout_delay = float(timeout_delay)
        self.host, self.port = host, port
        self.requests = 0
        self.connections = 0
        self.max_in_flight = 0
        self.injected = Counter()
        self._in_flight = 0
        self._seen = Counter()  # attempts per distinct body
        self._lock = threading.Lock()
        self._httpd = None
        self._thread = None

    @property
    def url(self):
        return f"http://{self.host}:{self.port}/v1"

    # ------------------------------------------------------------------ replies
    def _fault(self, body):
        """The fault of this attempt of ``body`` (None: answer normally)."""
        with self._lock:
            attempt = self._seen[body]
            self._seen[body] += 1
        if attempt >= self.fail_attempts or not self.faults:
            return None
        u = _unit(self.fault_seed, hashlib.sha256(body).hexdigest())
        for kind in FAULT_KINDS:
            share = self.faults.get(kind, 0.0)
            if u < share:
                return kind
            u -= share
        return None

    def answer(self, request):
        """The content of the completion for ``request`` (a decoded request body)."""
        from .llm import JUDGE_SYSTEM_PROMPT

        messages = request.get("messages") or [{}]
        text = str(messages[-1].get("content", ""))
        if messages[0].get("content") == JUDGE_SYSTEM_PROMPT:
            reply = text.split(_REPLY_TO_RATE, 1)[-1].split("\n\nReturn only", 1)[0]
            return json.dumps(rubric_for_reply(reply))
        return _USER_MESSAGES[int(_unit(text) * len(_USER_MESSAGES))]

    # ------------------------------------------------------------------ serving
    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive
            disable_nagle_algorithm = True  # headers and body go out as two writes

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with server._lock:
                    server.connections += 1

            def _send(self, status, payload=b""):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                if self.path != "/stats":
                    self._send(404, b'{"error": "not found"}')
                    return
                self._send(200, json.dumps(server.stats()).encode())

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                with server._lock:
                    server.requests += 1
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    self._serve(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (a timeout)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _serve(self, body):
                try:
                    request = json.loads(body)
                except ValueError:
                    self._send(400, b'{"error": "the body is not JSON"}')
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                fault = server._fault(body)
                if fault is not None:
                    with server._lock:
                        server.injected[fault] += 1
                if server.latency:
                    time.sleep(server.latency)
                if fault == "close":
                    self.close_connection = True  # nothing is sent
                    return
                if fault in ("http_500", "http_503"):
                    self._send(int(fault[-3:]), b'{"error": "overloaded"}')
                    return
                if fault == "malformed":
                    self._send(200, _completion("x")[:25])
                    return
                if fault == "timeout":
                    time.sleep(server.timeout_delay)
                content = server.answer(request)
                if fault == "bad_content":
                    content = "I'd rate it a 2." if content.startswith("{") else "   "
                self._send(200, _completion(content))

        return Handler

    def stats(self):
        """``requests``, ``connections``, ``max_in_flight`` and ``injected`` (by kind)."""
        with self._lock:
            return {"requests": self.requests, "connections": self.connections,
                    "max_in_flight": self.max_in_flight, "injected": dict(self.injected)}

    def start(self):
        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False
            request_queue_size = 256  # many episodes connect at once

        self._httpd = Server((self.host, self.port), self._handler())
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None):
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="python -m mica_train.env.local_server",
                                description="A deterministic OpenAI-compatible chat server on 127.0.0.1.")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    p.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    args = p.parse_args(argv)
    server = LocalChatServer(args.latency, port=args.port).start()
    print(server.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
