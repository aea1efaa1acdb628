"""The LLM client against a hostile chat-completions server on 127.0.0.1 (raw sockets, so
that it can misbehave below HTTP): a huge body, an endless chunked body, a server that drips
its answer, JSON nested thousands deep, credentials in the URL, and SIGTERM while a request
hangs. Every server loop is bounded and also stops when the client hangs up."""

import base64
import json
import logging
import signal
import socketserver
import subprocess
import threading
import time
import tracemalloc

import pytest

from mica_train.env import EnvConfig, eval_scenarios, make_env
from mica_train.env.errors import EndpointError
from mica_train.env.llm import (
    ChatClient,
    RequestStats,
    judge_prompt,
    parse_judge_reply,
)

RUBRIC = {"C.Prog": 2, "C.Neg": 0, "A.Prog": 1, "A.Neg": 0, "P.Prog": 0, "P.Neg": 0}
SCENARIO = eval_scenarios()[0]
DEEP = 5000  # far past Python's recursion limit (1000)


def completion(content):
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant",
                                                            "content": content}}]}).encode()


def deep_list(depth):
    return "[" * depth + "]" * depth


class Hostile:
    """What the server does with each request (``behaviour``), and what it saw: requests,
    their headers, bytes it sent, and whether the client hung up before it finished."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.requests = 0
        self.headers = []
        self.sent = 0
        self.hung_up = 0
        self.finished = 0
        self.lock = threading.Lock()


def _read_request(rfile):
    head = []
    while True:
        line = rfile.readline(65536)
        if not line or line in (b"\r\n", b"\n"):
            break
        head.append(line.decode("latin-1").rstrip("\r\n"))
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = rfile.read(int(headers.get("content-length", 0)))
    return headers, body


@pytest.fixture
def hostile(monkeypatch):
    """``start(behaviour) -> (Hostile, base_url)``; ``behaviour(send, state)`` writes the
    answer with ``send(bytes)``, which raises ``ConnectionError`` once the client is gone."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers = []

    def start(behaviour):
        state = Hostile(behaviour)

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                while True:  # keep-alive: one connection may carry several requests
                    headers, _ = _read_request(self.rfile)
                    if not headers:
                        return
                    with state.lock:
                        state.requests += 1
                        state.headers.append(headers)

                    def send(data):
                        self.connection.sendall(data)
                        with state.lock:
                            state.sent += len(data)

                    try:
                        state.behaviour(send, state)
                    except OSError:  # BrokenPipe, ConnectionReset: the client hung up
                        with state.lock:
                            state.hung_up += 1
                        return
                    with state.lock:
                        state.finished += 1

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            block_on_close = False

        server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        servers.append(server)
        return state, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def ok_headers(length=None, chunked=False):
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n"
    elif length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + "\r\n").encode()


def answer(payload):
    def behaviour(send, state):
        send(ok_headers(len(payload)) + payload)
    return behaviour


def ask(url, **kw):
    kw = {"timeout": 10.0, "retries": 0, "backoff": 0.0, "sleep": lambda s: None, **kw}
    stats = RequestStats()
    with ChatClient(url, "m", **kw) as c:
        try:
            return c.complete(judge_prompt(SCENARIO, (-10, -5, -5), [], "Perhaps."),
                              parse=parse_judge_reply, stats=stats), stats
        except EndpointError as e:
            return e, stats


# ---------------------------------------------------------------- size cap
def test_a_huge_body_is_abandoned_at_the_cap(hostile):
    total = 200 * 2**20  # the server would send 200 MB
    chunk = b" " * 65536

    def huge(send, state):
        send(ok_headers(total))
        for _ in range(total // len(chunk)):
            send(chunk)

    state, url = hostile(huge)
    tracemalloc.start()
    try:
        err, stats = ask(url, max_response_bytes=256 * 1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(err, EndpointError) and "larger than max_response_bytes=262144" in str(err)
    assert stats.bad_responses == 1 and stats.requests == 1
    assert peak < 16 * 2**20            # megabytes held, not the 200 MB (or 1 GB) of the body
    deadline = time.monotonic() + 30    # the server notices the hang-up on its next write
    while not state.hung_up and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.hung_up == 1 and state.finished == 0 and state.sent < total // 4


def test_a_declared_huge_length_is_refused_before_reading(hostile):
    state, url = hostile(lambda send, st: send(ok_headers(10**12) + b"[" * 1000))
    err, stats = ask(url, max_response_bytes=4096, retries=1)
    assert "larger than max_response_bytes=4096" in str(err)
    assert stats.bad_responses == 2 and state.requests == 2


def test_an_endless_chunked_body_stops_at_the_cap(hostile):
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"

    def endless(send, state):
        send(ok_headers(chunked=True))
        for _ in range(100_000):        # 1.6 GB at most; the client hangs up long before
            send(chunk)

    state, url = hostile(endless)
    err, stats = ask(url)               # the default cap, 1 MiB
    assert "larger than max_response_bytes=1048576" in str(err)
    assert stats.bad_responses == 1
    deadline = time.monotonic() + 30
    while not state.hung_up and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.hung_up == 1 and state.finished == 0


def test_a_compressed_body_is_refused(hostile):
    """A gzip bomb: 64 KiB on the wire, 64 MiB once inflated. The client asks for no
    compression and never inflates what it gets."""
    import gzip

    bomb = gzip.compress(b"[" * 2**26, compresslevel=9)

    def gzipped(send, state):
        send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
             + f"Content-Length: {len(bomb)}\r\n\r\n".encode() + bomb)

    state, url = hostile(gzipped)
    tracemalloc.start()
    try:
        err, stats = ask(url, retries=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(bomb) < 2**20 and "the response is compressed (gzip)" in str(err)
    assert stats.bad_responses == 2 and peak < 8 * 2**20
    assert state.headers[0]["accept-encoding"] == "identity"


def test_a_body_under_the_cap_is_read(hostile):
    _, url = hostile(answer(completion(json.dumps(RUBRIC))))
    rubric, stats = ask(url, max_response_bytes=1024)
    assert rubric == RUBRIC and stats.requests == 1


def test_max_response_bytes_is_checked():
    with pytest.raises(ValueError, match="max_response_bytes must be an integer >= 1024"):
        EnvConfig(max_response_bytes=10)
    assert EnvConfig().max_response_bytes == 2**20


@pytest.mark.parametrize("field, value, message", [
    ("timeout", 0, r"timeout must be in \(0, 86400.0\] seconds"),
    ("timeout", 1e300, r"timeout must be in \(0, 86400.0\] seconds"),   # no socket waits that long
    ("timeout", float("inf"), "timeout must be a finite number"),
    ("backoff_max", float("inf"), "backoff_max must be a finite number"),
])
def test_deadline_and_backoff_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        EnvConfig(**{field: value})


def test_the_retry_delay_of_a_late_retry_stays_a_number():
    c = ChatClient("http://127.0.0.1:9/v1", "m", backoff=0.5, backoff_max=8.0, jitter=0.0)
    assert c.retry_delay(2000) == 8.0   # 0.5 * 2 ** 1999 does not fit a float


# ---------------------------------------------------------------- deadline
@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_dripping_server_cannot_outlive_the_timeout(hostile, where):
    """Each byte comes well within the timeout, so only an overall deadline ends the call.
    Without one the drip (about a minute) is read to its end and the call succeeds."""
    payload = completion(json.dumps(RUBRIC)) + b" " * 1000   # JSON may end in white space
    head = ok_headers(len(payload))
    split = 10 if where == "headers" else len(head)

    def drip(send, state):
        send(head[:split])
        for byte in head[split:] + payload:     # about a minute, a byte every 0.05 s
            send(bytes([byte]))
            time.sleep(0.05)

    state, url = hostile(drip)
    t0 = time.monotonic()
    err, stats = ask(url, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert isinstance(err, EndpointError) and "timeout" in str(err)
    assert stats.timeouts == 1 and stats.requests == 1
    assert elapsed < 30                 # the drip lasts about a minute
    deadline = time.monotonic() + 30
    while not state.hung_up and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.hung_up == 1 and state.finished == 0


# ---------------------------------------------------------------- nesting
def test_a_deeply_nested_body_is_a_bad_response(hostile):
    _, url = hostile(answer(deep_list(DEEP).encode()))
    err, stats = ask(url, retries=1)
    assert isinstance(err, EndpointError) and "nested too deeply" in str(err)
    assert stats.bad_responses == 2


@pytest.mark.parametrize("content", [
    deep_list(DEEP),                                            # the completion itself
    json.dumps({**RUBRIC, "C.Prog": "@"}).replace('"@"', deep_list(DEEP)),  # one value
    json.dumps({**RUBRIC, "C.Prog": "@"}).replace('"@"', deep_list(980)),   # near the limit
])
def test_a_deeply_nested_completion_is_a_parse_failure(hostile, content):
    _, url = hostile(answer(completion(content)))
    err, stats = ask(url, retries=1)
    assert isinstance(err, EndpointError)
    assert stats.parse_failures == 2 and stats.requests == 2


def test_nested_json_fails_the_judge_turn_not_the_run(hostile):
    """Through the environment, episodes stepped on worker threads: the turns count as
    judge failures and every episode goes on."""
    _, url = hostile(answer(completion(deep_list(DEEP))))
    cfg = EnvConfig(simulator="llm_judge", base_url=url, model="m", retries=1, backoff=0.0,
                    max_concurrency=4, max_turns=3, min_turns=3)
    with make_env(cfg) as env:
        episodes = env.reset_episodes([SCENARIO] * 4, range(4))
        results = env.step_episodes(episodes, ["Perhaps."] * 4)
    assert all(r.judge_failed for r in results)
    for ep in episodes:
        m = ep.metrics()
        assert m["judge_failures"] == 1 and m["llm_parse_failures"] == 2


# ---------------------------------------------------------------- credentials
def test_a_password_in_the_url_is_never_shown(hostile, caplog):
    user, password = "alice", "s3cret-p@ss"
    key = "sk-hostile-key-4242"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    fail = lambda send, st: send(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")  # noqa: E731
    state, url = hostile(fail)
    secret_url = url.replace("http://", f"http://{user}:s3cret-p%40ss@")
    with caplog.at_level(logging.DEBUG):   # httpx's own request log included
        err, stats = ask(secret_url, retries=2, api_key=key)
        with pytest.raises(ValueError) as bad_scheme:
            ChatClient(secret_url.replace("http://", "ftp://"), "m")
        with pytest.raises(ValueError) as no_scheme:
            ChatClient(secret_url.replace("http://", ""), "m")
    # The credentials were sent, as HTTP Basic authentication (it replaces the Bearer key).
    assert state.requests == 3 and stats.retries == 2
    assert state.headers[0]["authorization"] == f"Basic {token}"
    cfg = EnvConfig(simulator="llm_judge", base_url=secret_url, model="m", api_key=key)
    text = "\n".join([caplog.text, str(err), str(bad_scheme.value), str(no_scheme.value),
                      repr(ChatClient(secret_url, "m", api_key=key)), repr(cfg),
                      json.dumps(cfg.to_dict(), default=str)])
    assert cfg.to_dict()["base_url"] == url.replace("http://", "http://***@")
    assert "failed (attempt 2 of 3)" in caplog.text and "HTTP Request: POST" in caplog.text
    assert "'ftp://***@127.0.0.1" in str(bad_scheme.value)
    assert "'***@127.0.0.1" in str(no_scheme.value)
    for secret in (password, "s3cret-p%40ss", token, key):
        assert secret not in text


def test_an_api_key_that_cannot_be_a_header_is_refused_without_showing_it(hostile):
    _, url = hostile(answer(completion(json.dumps(RUBRIC))))
    for bad in ("sk-abc\ndef-secret", "sk-\x00secret", "sk-s\u00e9cret"):
        with pytest.raises(ValueError, match="cannot go in an HTTP header") as e:
            ChatClient(url, "m", api_key=bad)
        assert "secret" not in str(e.value)
    rubric, _ = ask(url, api_key="sk-from-a-file\n")   # a key file's newline is dropped
    assert rubric == RUBRIC


def test_a_token_as_url_user_name_is_never_shown(hostile, caplog):
    _, url = hostile(lambda send, st: send(b"HTTP/1.1 500 No\r\nContent-Length: 0\r\n\r\n"))
    with caplog.at_level(logging.DEBUG):
        err, _ = ask(url.replace("http://", "http://tok-123456789@"), retries=1)
    assert caplog.records and "tok-123456789" not in caplog.text + str(err)


# ---------------------------------------------------------------- interruption
def drip_forever(send, state):
    send(ok_headers(10**6))
    for _ in range(3000):               # 5 minutes at most
        send(b" ")
        time.sleep(0.1)


def test_an_interrupted_step_ends_its_requests_and_the_env_still_works(hostile, monkeypatch):
    """Ctrl-C (or mica's SIGTERM exception) while step_episodes waits on hanging requests,
    with the timeout at 10 minutes: the requests end at once, and later steps are served."""
    import concurrent.futures

    state, url = hostile(drip_forever)
    real_wait = concurrent.futures.wait

    def interrupted_wait(futures, *args, **kw):
        deadline = time.monotonic() + 60
        while state.requests < 4 and time.monotonic() < deadline:
            time.sleep(0.02)            # until every episode's judge request hangs
        raise KeyboardInterrupt

    cfg = EnvConfig(simulator="llm_judge", base_url=url, model="m", timeout=600, retries=3,
                    max_concurrency=4, max_turns=3, min_turns=3)
    with make_env(cfg) as env:
        episodes = env.reset_episodes([SCENARIO] * 4, range(4))
        monkeypatch.setattr(concurrent.futures, "wait", interrupted_wait)
        with pytest.raises(KeyboardInterrupt):
            env.step_episodes(episodes, ["Perhaps."] * 4)
        monkeypatch.setattr(concurrent.futures, "wait", real_wait)
        # The workers finish their steps, the judge turn failed, nothing was retried.
        deadline = time.monotonic() + 30
        while any(ep.turn == 0 for ep in episodes) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [ep.metrics()["judge_failures"] for ep in episodes] == [1] * 4
        assert [ep.metrics()["llm_requests"] for ep in episodes] == [1] * 4
        state.behaviour = answer(completion(json.dumps(RUBRIC)))
        fresh = env.reset_episodes([SCENARIO] * 4, range(4))
        results = env.step_episodes(fresh, ["Perhaps."] * 4)
    assert [r.rubric for r in results] == [RUBRIC] * 4


# ---------------------------------------------------------------- SIGTERM
def test_sigterm_during_a_hanging_request_ends_mica(hostile, tiny_model_dir, tmp_path):
    """``mica eval`` with the LLM judge, whose requests (on worker threads) hang on a server
    that drips its answer for minutes, with the timeout at 10 minutes: SIGTERM must end the
    process at once, with mica's one line and status 143."""
    from train_helpers import MICA, subprocess_env

    state, url = hostile(drip_forever)
    extra = json.dumps({"base_url": url, "model": "m", "timeout": 600, "retries": 3})
    cmd = [str(MICA), "eval", "--config", "tiny", f"model.path={tiny_model_dir}",
           f"run_dir={tmp_path / 'run'}", "--checkpoint", "base", "env.simulator=llm_judge",
           f"env.extra={extra}", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1"))
    try:
        deadline = time.monotonic() + 300   # loading torch and the model, on a busy machine
        while state.requests < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)                # until several requests hang at once
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)             # the drip lasts 5 minutes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "mica: interrupted (SIGTERM)"
    assert "Traceback" not in err and out == ""
