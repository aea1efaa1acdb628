"""LLM user and judge against a real HTTP server on 127.0.0.1 (started by the tests)."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mica_core import MicaInputError
from mica_train.env import EnvConfig, eval_scenarios, make_env, sample_reply
from mica_train.env.errors import EndpointConfigError, EndpointError, JudgeError
from mica_train.env.llm import (
    JUDGE_SYSTEM_PROMPT,
    ChatClient,
    judge_prompt,
    parse_judge_reply,
    parse_user_reply,
)

KEY = "sk-test-7f3a9c-not-for-logs"
RUBRIC = {"C.Prog": 2, "C.Neg": 0, "A.Prog": 1, "A.Neg": 0, "P.Prog": 0, "P.Neg": 0}
SCENARIO = eval_scenarios()[0]


def completion(content):
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant",
                                                            "content": content},
                                    "finish_reason": "stop"}]}).encode()


class Endpoint:
    """Scripted chat-completions server. ``script`` is a list of actions used in order
    (the last one repeats): ("ok", content) | ("status", code) | ("sleep", seconds, content)
    | ("raw", bytes). With ``script=None`` it answers by role: the rubric for judge
    requests, a short message for user requests."""

    def __init__(self):
        self.script = None
        self.requests = []
        self.lock = threading.Lock()

    def next_action(self, body):
        with self.lock:
            self.requests.append(body)
            if self.script is None:
                system = body["messages"][0]["content"]
                if system == JUDGE_SYSTEM_PROMPT:
                    return ("ok", json.dumps(RUBRIC))
                return ("ok", "I still don't get why this happened to me.")
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]


@pytest.fixture(scope="module")
def server():
    """One server per module; each test installs its own ``Endpoint`` script."""
    holder = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            body["_path"] = self.path
            body["_auth"] = self.headers.get("Authorization")
            action = holder["endpoint"].next_action(body)
            try:
                if action[0] == "status":
                    self.send_response(action[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action[0] == "sleep":
                    time.sleep(action[1])
                    payload = completion(action[2])
                elif action[0] == "raw":
                    payload = action[1]
                else:
                    payload = completion(action[1])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    holder["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield holder
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def endpoint(server, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    state = Endpoint()
    state.url = server["url"]
    server["endpoint"] = state
    return state


def client(endpoint, **kw):
    sleeps = []
    # No jitter: the tests below check the exact schedule (test_backoff_jitter the jitter).
    kw = {"timeout": 2.0, "retries": 2, "backoff": 0.01, "backoff_max": 0.02, "jitter": 0.0,
          "sleep": sleeps.append, **kw}
    c = ChatClient(endpoint.url, "tiny-judge", KEY, **kw)
    c.sleeps = sleeps
    return c


def ask_judge(c):
    return c.complete(judge_prompt(SCENARIO, (-10, -5, -5), [], "Perhaps."),
                      parse=parse_judge_reply)


# ---------------------------------------------------------------- client
def test_good_reply(endpoint):
    endpoint.script = [("ok", json.dumps(RUBRIC))]
    c = client(endpoint)
    assert ask_judge(c) == RUBRIC
    req = endpoint.requests[0]
    assert req["_path"] == "/v1/chat/completions" and req["model"] == "tiny-judge"
    assert req["_auth"] == f"Bearer {KEY}"
    assert req["messages"][0]["role"] == "system" and "JSON" in req["messages"][0]["content"]
    assert "Perhaps." in req["messages"][1]["content"]
    assert c.requests == 1 and c.sleeps == []


def test_code_fenced_json_is_accepted(endpoint):
    endpoint.script = [("ok", "```json\n" + json.dumps(RUBRIC) + "\n```")]
    assert ask_judge(client(endpoint)) == RUBRIC


@pytest.mark.parametrize("bad", [
    "Sure! " + json.dumps(RUBRIC),                       # prose around the object
    "{'C.Prog': 2}",                                     # not JSON
    json.dumps({**RUBRIC, "C.Prog": 3}),                 # out of range
    json.dumps({k: v for k, v in RUBRIC.items() if k != "A.Neg"}),   # missing key
    json.dumps([RUBRIC]),                                # not an object
])
def test_malformed_judge_replies_are_retried(endpoint, bad):
    endpoint.script = [("ok", bad), ("ok", json.dumps(RUBRIC))]
    c = client(endpoint)
    assert ask_judge(c) == RUBRIC
    assert c.requests == 2 and c.sleeps == [0.01]


def test_server_errors_are_retried_with_backoff(endpoint):
    endpoint.script = [("status", 500), ("status", 503), ("ok", json.dumps(RUBRIC))]
    c = client(endpoint, retries=3, backoff=0.01, backoff_max=1.0)
    assert ask_judge(c) == RUBRIC
    assert c.sleeps == [0.01, 0.02] and c.requests == 3


def test_rate_limit_and_non_completion_bodies_are_retried(endpoint):
    endpoint.script = [("status", 429), ("raw", b'{"error": "busy"}'), ("raw", b"<html>"),
                       ("ok", json.dumps(RUBRIC))]
    c = client(endpoint, retries=3)
    assert ask_judge(c) == RUBRIC and c.requests == 4


def test_timeouts_are_retried(endpoint):
    endpoint.script = [("sleep", 1.0, json.dumps(RUBRIC)), ("ok", json.dumps(RUBRIC))]
    c = client(endpoint, timeout=0.2)
    assert ask_judge(c) == RUBRIC and c.requests == 2


def test_failure_after_retries(endpoint):
    endpoint.script = [("status", 502)]
    c = client(endpoint, retries=2)
    with pytest.raises(EndpointError, match="after 3 attempts: HTTP 502"):
        ask_judge(c)
    assert c.requests == 3 and c.sleeps == [0.01, 0.02]


@pytest.mark.parametrize("code", [400, 401, 404])
def test_configuration_errors_are_not_retried(endpoint, code):
    endpoint.script = [("status", code)]
    c = client(endpoint)
    with pytest.raises(EndpointConfigError, match=f"HTTP {code}"):
        ask_judge(c)
    assert c.requests == 1


def test_unreachable_endpoint_is_retried_then_fails():
    c = ChatClient("http://127.0.0.1:9/v1", "m", timeout=0.5, retries=1, backoff=0.0)
    with pytest.raises(EndpointError, match="after 2 attempts"):
        c.complete([{"role": "user", "content": "hi"}])


def test_the_key_is_never_logged(endpoint, caplog, monkeypatch):
    monkeypatch.setenv("MICA_TEST_KEY", KEY)
    endpoint.script = [("ok", f"not json {KEY}"), ("status", 500)]
    cfg = EnvConfig(simulator="llm", base_url=endpoint.url, model="m",
                    api_key_env="MICA_TEST_KEY", retries=2, backoff=0.0)
    env = make_env(cfg)
    with caplog.at_level(logging.DEBUG):
        ep = env.reset(SCENARIO, seed=0)
        ep.step("Perhaps there is another way to see this.")
    assert endpoint.requests[0]["_auth"] == f"Bearer {KEY}"   # the key was used ...
    assert caplog.records                                        # ... failures were logged ...
    text = caplog.text + repr(cfg) + repr(env._client) + json.dumps(cfg.to_dict(), default=str)
    assert KEY not in text                                       # ... but never the key
    assert ep.metrics()["judge_failures"] == 1


def test_missing_endpoint_settings_are_clear_errors(monkeypatch):
    monkeypatch.delenv("MICA_LLM_BASE_URL", raising=False)
    monkeypatch.delenv("MICA_LLM_MODEL", raising=False)
    with pytest.raises(MicaInputError, match="MICA_LLM_BASE_URL"):
        make_env(EnvConfig(simulator="llm"))
    with pytest.raises(MicaInputError, match="MICA_LLM_MODEL"):
        make_env(EnvConfig(simulator="llm", base_url="http://127.0.0.1:1/v1"))
    with pytest.raises(MicaInputError, match="http"):
        make_env(EnvConfig(simulator="llm", base_url="127.0.0.1:1", model="m"))


def test_settings_come_from_the_environment(endpoint, monkeypatch):
    monkeypatch.setenv("MICA_LLM_BASE_URL", endpoint.url)
    monkeypatch.setenv("MICA_LLM_MODEL", "env-model")
    monkeypatch.setenv("MICA_LLM_API_KEY", KEY)
    ep = make_env(EnvConfig(simulator="llm_judge")).reset(SCENARIO)
    ep.step("Perhaps.")
    assert endpoint.requests[0]["model"] == "env-model"
    assert endpoint.requests[0]["_auth"] == f"Bearer {KEY}"


def test_parse_user_reply():
    assert parse_user_reply('  User: "I feel lost."  ') == "I feel lost."
    for bad in ["", "   ", "User:", "x" * 2000]:
        with pytest.raises(ValueError):
            parse_user_reply(bad)


# ---------------------------------------------------------------- episodes
def llm_env(endpoint, **kw):
    return make_env(EnvConfig(simulator="llm", base_url=endpoint.url, model="m", api_key=KEY,
                              retries=1, backoff=0.0, timeout=2.0, **kw))


def test_llm_episode(endpoint):
    ep = llm_env(endpoint, max_turns=3, min_turns=3).reset(SCENARIO, seed=0)
    assert ep.messages[0] == {"role": "user",
                              "content": "I still don't get why this happened to me."}
    reply = "Perhaps there is another way to see this."
    res = ep.step(reply)
    assert res.rubric == RUBRIC and not res.judge_failed
    p0 = SCENARIO.initial_state
    assert res.state == (p0[0] + 3, p0[1] + 1, p0[2])
    judge_req = endpoint.requests[1]
    assert judge_req["messages"][0]["content"] == JUDGE_SYSTEM_PROMPT
    assert reply in judge_req["messages"][1]["content"]
    assert SCENARIO.needs["C"] in judge_req["messages"][1]["content"]
    assert judge_req["temperature"] == 0.0
    while not ep.done:
        ep.step(reply)
    assert ep.status == "max_turns" and ep.metrics()["judge_failures"] == 0
    assert len(ep.messages) == 6


def _judge_fails_on_second_turn(endpoint):
    calls = {"judge": 0}
    original = endpoint.next_action

    def next_action(body):
        if body["messages"][0]["content"] == JUDGE_SYSTEM_PROMPT:
            calls["judge"] += 1
            if calls["judge"] in (2, 3):            # turn 2 and its one retry
                with endpoint.lock:
                    endpoint.requests.append(body)
                return ("ok", "I'd rate it a 2 overall.")
        return original(body)

    endpoint.next_action = next_action


def test_failed_judge_turn_uses_the_trajectory_mean(endpoint):
    _judge_fails_on_second_turn(endpoint)
    ep = llm_env(endpoint).reset(SCENARIO, seed=0)
    r1 = ep.step("Perhaps.")
    r2 = ep.step("Perhaps.")
    assert r2.judge_failed and r2.rubric is None
    assert r2.state == tuple(a + (a - b) for a, b in zip(r1.state, SCENARIO.initial_state))
    r3 = ep.step("Perhaps.")
    assert not r3.judge_failed
    m = ep.metrics()
    assert m["judge_failures"] == 1
    assert ep.rubrics[1] is None


def test_failed_judge_turn_can_be_dropped(endpoint):
    _judge_fails_on_second_turn(endpoint)
    ep = llm_env(endpoint, on_judge_failure="drop").reset(SCENARIO, seed=0)
    r1 = ep.step("Perhaps.")
    r2 = ep.step("Perhaps.")
    assert r2.judge_failed and r2.state == r1.state and r2.energy == 0.0
    assert r2.distance == r1.distance and ep.turn == 2
    assert ep.metrics()["judge_failures"] == 1


def test_judge_error_from_first_turn_mean_is_zero(endpoint):
    endpoint.script = None
    ep = llm_env(endpoint).reset(SCENARIO, seed=0)   # opening message served
    endpoint.script = [("status", 500)]
    r = ep.step("Perhaps.")
    assert r.judge_failed and r.state == SCENARIO.initial_state
    assert r.user_message                      # the user fell back to the template
    assert ep.metrics()["user_failures"] == 1


def test_user_failure_falls_back_to_the_template(endpoint):
    endpoint.script = [("status", 503)]
    ep = llm_env(endpoint).reset(SCENARIO, seed=0)
    assert ep.messages[0]["content"]            # template opening
    assert ep.metrics()["user_failures"] == 1


def test_configuration_error_propagates_from_step(endpoint):
    ep = llm_env(endpoint).reset(SCENARIO, seed=0)
    endpoint.script = [("status", 401)]
    with pytest.raises(EndpointConfigError):
        ep.step("Perhaps.")


def test_llm_judge_raises_judge_error(endpoint):
    from mica_train.env.llm import LLMJudge

    endpoint.script = [("ok", "no json here")]
    cfg = EnvConfig(simulator="llm_judge", base_url=endpoint.url, model="m", retries=1,
                    backoff=0.0)
    j = LLMJudge(ChatClient.from_config(cfg), SCENARIO, [], cfg)
    with pytest.raises(JudgeError, match="not a JSON object"):
        j.judge(sample_reply("plan", __import__("random").Random(0)), (-5, -5, -5))


def test_json_mode_sends_response_format(endpoint):
    env = make_env(EnvConfig(simulator="llm_judge", base_url=endpoint.url, model="m",
                             json_mode=True))
    env.reset(SCENARIO).step("Perhaps.")
    assert endpoint.requests[-1]["response_format"] == {"type": "json_object"}
