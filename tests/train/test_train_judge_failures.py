"""Failed judge turns in training: counted per step in metrics.jsonl, and a run whose judge
fails on more than ``env.max_judge_failure_share`` of a step's turns stops (exit 2) before
training on fallback rewards. The judge is a real server on 127.0.0.1
(``mica_train.env.local_server``) failing by its fault injection."""

import json

import pytest
from train_helpers import run_mica

from mica_train.config import ConfigError, check_config, check_resume, config_to_dict, load_config
from mica_train.env.local_server import LocalChatServer

ALWAYS = 10**9  # fail_attempts: a faulty request fails however often it is retried


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def llm_overrides(url, run, model, *more):
    extra = json.dumps({"base_url": url, "model": "local", "retries": 0, "backoff": 0.0})
    return [f"model.path={model}", f"run_dir={run}", "env.simulator=llm_judge",
            f"env.extra={extra}", "tensorboard=false", "plot=false", *more]


def test_a_step_whose_judge_always_fails_stops_mica_train(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    with LocalChatServer(faults={"http_500": 1.0}, fail_attempts=ALWAYS) as server:
        res = run_mica("train", "--config", "tiny", *llm_overrides(server.url, run, tiny_model_dir))
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("mica train: error: step 1: the judge failed on 24 turns (100% "
                                "of the step's turns), more than env.max_judge_failure_share=0.5")
    assert "llm_server_errors=24" in lines[-1] and "Traceback" not in res.stderr
    assert server.injected["http_500"] == 24
    # Nothing was trained or recorded for the step.
    assert (run / "metrics.jsonl").read_text() == ""
    assert not (run / "checkpoints").exists()


def test_judge_failures_are_recorded_per_step(tiny_model_dir, tmp_path):
    from mica_train.trainer import JudgeFailureStop, Trainer

    faults = {"bad_content": 0.3}  # about 30% of judge requests get a reply that is no rubric
    with LocalChatServer(faults=faults, fail_attempts=ALWAYS) as server:
        run = tmp_path / "tolerant"
        cfg = load_config("tiny", llm_overrides(server.url, run, tiny_model_dir, "steps=2",
                                                "env.max_judge_failure_share=1"))
        Trainer(cfg).train()
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        for r in rows:
            # retries=0: each failed judge turn is one completion that did not parse.
            assert r["judge_failures"] == r["llm_parse_failures"]
            assert r["judge_failure_rate"] == pytest.approx(r["judge_failures"] / r["turns"])
            assert r["user_failures"] == 0
        assert 0 < sum(r["judge_failures"] for r in rows) == server.injected["bad_content"]

        strict = load_config("tiny", llm_overrides(server.url, tmp_path / "strict", tiny_model_dir,
                                                   "env.max_judge_failure_share=0"))
        first = rows[0]["judge_failures"]
        with pytest.raises(JudgeFailureStop, match=f"step 1: the judge failed on {first} turns"):
            Trainer(strict).train()
    assert (tmp_path / "strict" / "metrics.jsonl").read_text() == ""


def test_max_judge_failure_share_is_checked_and_may_change_on_resume():
    for bad in ("1.5", "-0.1", ".nan"):
        cfg = load_config(None, [f"env.max_judge_failure_share={bad}"])
        with pytest.raises(ConfigError, match="env.max_judge_failure_share must be a number in"):
            check_config(cfg)
    assert load_config(None).env.max_judge_failure_share == 0.5
    # A run saved before the field existed, or with another share, resumes.
    saved = config_to_dict(load_config(None))
    del saved["env"]["max_judge_failure_share"]
    check_resume(saved, load_config(None, ["env.max_judge_failure_share=0.9"]), "run_dir x")


def test_an_endpoint_that_refuses_the_request_is_one_line(tiny_model_dir, tmp_path):
    """A wrong URL, model or key (HTTP 4xx: EndpointConfigError) is no judge failure to count:
    mica train and mica eval stop with one line naming the endpoint, never its password."""
    with LocalChatServer() as server:
        url = server.url.replace("http://", "http://user:SECRET-9@") + "/no/such/path"
        train = run_mica("train", "--config", "tiny", *llm_overrides(url, tmp_path / "run", tiny_model_dir))
        evaluation = run_mica("eval", "--config", "tiny", "--checkpoint", "base",
                              *llm_overrides(url, tmp_path / "eval", tiny_model_dir, "eval.max_turns=2"))
    for res, name in ((train, "train"), (evaluation, "eval")):
        assert res.returncode == 2, res.stderr[-3000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"mica {name}: error: ") and "HTTP 404" in last, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and "SECRET-9" not in res.stderr + res.stdout
