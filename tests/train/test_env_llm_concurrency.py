"""Concurrent LLM episodes against mica_train.env.local_server on 127.0.0.1: the same results
at every concurrency level, connection reuse, and faults under concurrency (timeouts, 5xx,
malformed JSON, closed connections), each counted, with no episode lost or duplicated."""

import random

import pytest

from mica_train.env import EnvConfig, eval_scenarios, make_env, sample_reply
from mica_train.env.acts import SUPPORT_ACTS
from mica_train.env.llm import ChatClient, RequestStats, progress_rubric_schema
from mica_train.env.local_server import FAULT_KINDS, LocalChatServer, rubric_for_reply

SCENARIOS = eval_scenarios()[:4]
N_EPISODES = 12  # 4 scenarios x 3 rollouts


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def llm_config(url, **kw):
    kw = {"simulator": "llm", "base_url": url, "model": "local", "max_turns": 6, "min_turns": 4,
          "retries": 2, "backoff": 0.0, "backoff_max": 0.0, "timeout": 5.0, **kw}
    return EnvConfig(**kw)


def play(config, scenarios=SCENARIOS, rollouts=3):
    """Every episode to its end through reset_episodes / step_episodes; replies are scripted
    from each episode's own generator. Returns one dict per episode, in input order."""
    jobs = [(sc, k) for sc in scenarios for k in range(rollouts)]
    with make_env(config) as env:
        episodes = env.reset_episodes([sc for sc, _ in jobs], [k for _, k in jobs])
        rngs = [random.Random(f"test|{sc.id}|{k}") for sc, k in jobs]
        live = list(range(len(episodes)))
        while live:
            replies = [sample_reply(rngs[i].choice(SUPPORT_ACTS), rngs[i]) for i in live]
            env.step_episodes([episodes[i] for i in live], replies)
            live = [i for i in live if not episodes[i].done]
    return [{"scenario": ep.scenario.id, "seed": ep.seed, "messages": list(ep.messages),
             "states": ep.states, "distances": ep.distances, "rubrics": ep.rubrics,
             "status": ep.status, "metrics": ep.metrics()} for ep in episodes]


def outcome(episodes):
    """What must not depend on concurrency or on retried faults."""
    return [{k: e[k] for k in ("scenario", "seed", "messages", "states", "distances",
                               "rubrics", "status")} for e in episodes]


def total(episodes, key):
    return sum(e["metrics"][key] for e in episodes)


def test_results_do_not_depend_on_the_concurrency():
    with LocalChatServer(latency=0.005) as serial_server:
        serial = play(llm_config(serial_server.url, max_concurrency=1))
    with LocalChatServer(latency=0.005) as server:
        concurrent = play(llm_config(server.url, max_concurrency=8))
    assert outcome(concurrent) == outcome(serial)
    assert serial_server.max_in_flight == 1          # one request at a time ...
    assert server.max_in_flight > 1                   # ... and several at once
    assert server.requests == serial_server.requests == total(concurrent, "llm_requests")
    # The judge really rated each reply: its rubric is the server's rubric for that reply.
    for e in concurrent:
        replies = [m["content"] for m in e["messages"] if m["role"] == "assistant"]
        assert e["rubrics"] == [rubric_for_reply(r) for r in replies]
        assert len(e["distances"]) == len(replies) == e["metrics"]["turns"]


def test_connections_are_reused():
    with LocalChatServer() as server:
        episodes = play(llm_config(server.url, max_concurrency=4))
    requests = total(episodes, "llm_requests")
    assert requests == server.requests and requests >= 10 * 4
    assert server.connections <= 4                    # the pool's size, not one per request


@pytest.mark.parametrize("kinds", [("http_500", "http_503"), ("malformed", "bad_content"),
                                   ("close",), ("timeout",)],
                         ids=["5xx", "malformed", "closed-connection", "timeout"])
def test_faults_under_concurrency_are_retried_and_counted(kinds):
    with LocalChatServer() as clean_server:
        clean = play(llm_config(clean_server.url, max_concurrency=1))
    share = 0.4 / len(kinds)
    with LocalChatServer(faults=dict.fromkeys(kinds, share), timeout_delay=1.0) as server:
        faulty = play(llm_config(server.url, max_concurrency=8, timeout=0.3))
    injected = server.injected
    assert sum(injected.values()) >= 5 and set(injected) == set(kinds), injected
    # Every fault was retried to success: the episodes are those of the fault-free run, one
    # each, in order, none lost or duplicated, no judge or user fallback.
    assert outcome(faulty) == outcome(clean)
    assert total(faulty, "judge_failures") == total(faulty, "user_failures") == 0
    # ... and each fault is counted under its kind.
    expected = {
        "llm_server_errors": injected["http_500"] + injected["http_503"],
        "llm_bad_responses": injected["malformed"],
        "llm_parse_failures": injected["bad_content"],
        "llm_connection_errors": injected["close"],
        "llm_timeouts": injected["timeout"],
    }
    assert {k: total(faulty, k) for k in expected} == expected
    assert total(faulty, "llm_retries") == sum(injected.values())
    assert total(faulty, "llm_requests") == total(clean, "llm_requests") + sum(injected.values())
    assert server.requests == total(faulty, "llm_requests")


def test_exhausted_retries_fall_back_and_are_counted():
    faults = {"http_500": 0.15, "close": 0.15}
    with LocalChatServer(faults=faults, fail_attempts=3) as server:   # retries=2: 3 attempts
        episodes = play(llm_config(server.url, max_concurrency=8))
    injected = sum(server.injected.values())
    failed = total(episodes, "judge_failures") + total(episodes, "user_failures")
    assert total(episodes, "judge_failures") >= 1 and total(episodes, "user_failures") >= 1
    # Each failed attempt was either retried or the last attempt of a request that failed.
    assert injected == total(episodes, "llm_retries") + failed
    assert total(episodes, "llm_server_errors") + total(episodes, "llm_connection_errors") == injected
    assert len(episodes) == N_EPISODES
    assert all(e["status"] != "running" for e in episodes)
    from mica_train.env import aggregate_metrics

    agg = aggregate_metrics([e["metrics"] for e in episodes])
    assert agg["llm_requests"] == server.requests
    assert agg["judge_failures"] == total(episodes, "judge_failures")


def test_a_configuration_error_surfaces_after_every_step_finished():
    from mica_train.env.errors import EndpointConfigError

    with LocalChatServer() as server:
        env = make_env(llm_config(server.url.replace("/v1", "/v2"), max_concurrency=4))
        with pytest.raises(EndpointConfigError, match="HTTP 404"):
            env.reset_episodes(SCENARIOS, [0] * len(SCENARIOS))
        env.close()


def test_step_episodes_rejects_an_episode_twice():
    with LocalChatServer() as server, make_env(llm_config(server.url)) as env:
        ep = env.reset(SCENARIOS[0])
        with pytest.raises(ValueError, match="twice"):
            env.step_episodes([ep, ep], ["a", "b"])


def test_backoff_jitter_stays_in_its_band():
    c = ChatClient("http://127.0.0.1:9/v1", "m", backoff=0.5, backoff_max=8.0, jitter=0.25)
    for attempt, base in ((1, 0.5), (2, 1.0), (5, 8.0), (9, 8.0)):
        delays = [c.retry_delay(attempt) for _ in range(200)]
        assert all(0.75 * base <= d <= base for d in delays)
        assert len(set(delays)) > 100                    # jittered, not constant
    assert c.retry_delay(1, retry_after="3") == 3.0      # Retry-After wins, up to the cap
    assert c.retry_delay(1, retry_after="60") == 8.0
    c.close()


def test_json_schema_response_format():
    seen = []

    class Recording(LocalChatServer):
        def answer(self, request):
            seen.append(request.get("response_format"))
            return super().answer(request)

    with Recording() as server:
        env = make_env(llm_config(server.url, simulator="llm_judge", json_schema=True))
        env.reset(SCENARIOS[0]).step("That sounds really hard.")
        env.close()
    fmt = seen[-1]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == progress_rubric_schema()
    schema = fmt["json_schema"]["schema"]
    assert schema["required"] == ["C.Prog", "C.Neg", "A.Prog", "A.Neg", "P.Prog", "P.Neg"]
    assert schema["properties"]["A.Neg"]["enum"] == [-2, -1, 0]


def test_request_stats_metric_names():
    assert set(RequestStats().as_metrics()) == {
        "llm_requests", "llm_retries", "llm_timeouts", "llm_connection_errors",
        "llm_server_errors", "llm_bad_responses", "llm_parse_failures"}
    assert set(FAULT_KINDS) == {"timeout", "http_500", "http_503", "malformed", "bad_content",
                                "close"}


def test_the_server_serves_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        LocalChatServer(host="0.0.0.0")


def test_the_llm_benchmark_runs(tmp_path):
    """bench.llm_concurrency at a toy size (a smoke run: no timing is checked), with its server
    as a separate process, as `make bench-llm` runs it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(root), "NO_PROXY": "127.0.0.1,localhost"}
    res = subprocess.run([sys.executable, "-m", "bench.llm_concurrency", "--episodes", "8", "--latency", "0.001",
                          "--concurrency", "8", "--max-turns", "3", "--min-turns", "2", "--out", str(out)],
                         cwd=root, env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["identical_trajectories"] is True
    serial, concurrent = result["serial"]["runs"][0], result["concurrent"]["runs"][0]
    assert serial["requests"] == concurrent["requests"] > 8 * 3
    assert serial["max_in_flight"] == 1 and concurrent["max_in_flight"] > 1
    assert serial["connections"] == 1 and 1 < concurrent["connections"] <= 8
