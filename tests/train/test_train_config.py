"""Training configs and the `mica train` / `mica eval` command line: packaged configs, dotted
overrides, every field's help on `--help`, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest
import yaml
from train_helpers import ROOT, run_mica, subprocess_env

from mica_train.cli import main
from mica_train.config import ConfigError, check_config, config_fields, load_config, packaged_configs


@pytest.mark.parametrize("module, argv, expect", [
    ("mica_train.cli", ["--help"], "tiny-model"),
    ("mica_train.cli", ["train", "--help"], "optim.lr"),
    ("mica_train.study", ["--help"], "--quick"),
])
def test_help_is_light(module, argv, expect):
    code = (
        f"import sys\nfrom {module} import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout and out.stdout.strip().endswith("[]")


def test_train_help_shows_every_field():
    res = run_mica("train", "--help")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())  # help lines are wrapped
    fields = config_fields()
    assert len(fields) > 50
    for name, type_name, _, help_text in fields:
        assert f" {name} " in text, name
        assert " ".join(help_text.split()) in text, name
        assert type_name in text, name
    assert "stop_after" not in text  # the resume test's kill hook is not a setting
    assert "packaged config (demo, smollm2, study, tiny; default: the built-in defaults)" in text
    assert "model.path" in run_mica("eval", "--help").stdout


def test_packaged_configs_and_files(tmp_path, monkeypatch):
    assert packaged_configs() == ["demo", "smollm2", "study", "tiny"]
    assert load_config("tiny").data.group_size == 3
    assert load_config("tiny.yaml").data.group_size == 3
    assert load_config("demo").steps == 40 and load_config("study").steps == 18
    assert load_config(None).loss.eps_high == 0.28  # the dataclass defaults
    # A file that exists wins over a packaged config of the same name.
    (tmp_path / "tiny.yaml").write_text("steps: 99\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny.yaml").steps == 99
    assert load_config("tiny").steps == 3


def test_overrides_dotted_words_and_set():
    res = run_mica("train", "optim.lr=3e-4", "--config", "tiny", "--set", "steps=7", "--print-config",
                   "lora.target_modules=[q_proj,v_proj]", "advantage.options={gamma: 0.9}", "steps=9")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["optim"]["lr"] == 3e-4 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["advantage"]["options"] == {"gamma": 0.9}
    assert cfg["steps"] == 9  # the dotted words apply after --set
    assert cfg["data"]["group_size"] == 3  # from the file


@pytest.mark.parametrize("words, message", [
    (["--config", "nope.yaml"], "config 'nope.yaml': no such file, and no packaged config"),
    (["--config", "BROKEN"], "not valid YAML at line 2"),
    (["optim.learning_rate=1"], "optim.learning_rate: unknown key (optim has: lr,"),
    (["optim.lrr=1"], "did you mean optim.lr?"),
    (["stop_after=2"], "stop_after: unknown key"),
    (["lora.enabled=maybe"], "lora.enabled: expected true or false, got 'maybe'"),
    (["steps=many"], "steps: expected int, got 'many'"),
    (["lora.target_modules=[q_proj"], "lora.target_modules=[q_proj: the value is not valid YAML"),
    (["tiny"], "expected KEY=VALUE, e.g. optim.lr=3e-4; to read a config, use --config tiny"),
    (["advantage.estimator=nope"], "advantage.estimator 'nope' is not registered"),
    (["data.group_size=1"], "data.group_size must be >= 2"),
    (["model.path=/nonexistent/model"], "model.path: /nonexistent/model: no such directory"),
    (["model.path=EMPTY"], "has no config.json: not a model directory"),
])
def test_train_errors_are_one_line(words, message, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: 3\nmodel: path: x\n")
    words = [str(broken) if w == "BROKEN" else w.replace("EMPTY", str(tmp_path)) for w in words]
    config = [] if "--config" in words else ["--config", "tiny"]
    res = run_mica("train", *config, *words)
    assert res.returncode == 2, res.stderr
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("mica train: error: ") and message in res.stderr


def test_eval_needs_a_checkpoint_unless_base(tiny_model_dir, tmp_path, capsys):
    common = ["--config", "tiny", f"model.path={tiny_model_dir}", f"run_dir={tmp_path / 'run'}",
              "eval.max_turns=2"]
    res = run_mica("eval", *common)  # --checkpoint latest is the default
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "--checkpoint latest: run_dir" in res.stderr and "has no checkpoint" in res.stderr
    res = run_mica("eval", *common, "--checkpoint", tmp_path / "nowhere")
    assert res.returncode == 2 and "no such directory" in res.stderr
    res = run_mica("eval", *common, "--checkpoint", tiny_model_dir)  # a model, not a LoRA checkpoint
    assert res.returncode == 2 and "has no adapter_config.json" in res.stderr
    # The explicit way to evaluate the model itself (in this process: torch is loaded already).
    assert main(["eval", *common, "--checkpoint", "base"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["weights"] == f"base: {tiny_model_dir}" and metrics["n"] == 30


@pytest.mark.parametrize("override, message", [
    ("advantage.options={gammma: 0.9}", "unknown option 'advantage.options.gammma'; known: gamma, "),
    ("advantage.options={gamma: 2}", "advantage.options.gamma must be a number in [0, 1] or None; got 2"),
    ("advantage.options={weight: high}", "advantage.options.weight must be a number in [0, 1]; got 'high'"),
    ("advantage.options={lone_rollout: zero}", "unknown option 'advantage.options.lone_rollout'"),
    ("advantage.options={eps: 0}", "eps must be > 0 with scale='std'"),
    ("env.simulator=chat", "env.simulator: simulator must be one of"),
    ("env.extra={retries: -1}", "env.extra.retries: retries must be an integer >= 0"),
    ("env.extra={endpoint: x}", "env.extra.endpoint: unknown key"),
    ("model.dtype=fp8", "model.dtype must be one of"),
    ("data.scenarios_file=/nonexistent.jsonl", "data.scenarios_file: /nonexistent.jsonl: no such file"),
])
def test_check_config(override, message):
    check_config(load_config("tiny"))
    with pytest.raises(ConfigError) as err:
        check_config(load_config("tiny", [override]))
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
