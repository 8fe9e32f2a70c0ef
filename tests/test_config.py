from __future__ import annotations

import re
from pathlib import Path

import pytest

from dtrain.config import JobConfig, check_world_size, from_dict, load_config, to_dict, to_yaml
from dtrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["digits.yaml", "gpt.yaml", "gpt-1b.yaml", "gpt-1b-small.yaml"])
def test_example_configs_load(name: str) -> None:
    path = REPO / "configs" / name
    if not path.exists():
        pytest.skip(f"{name} not in this tree yet")
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\ntrain:\n  max_steps: 7\n")
    cfg = load_config(f, ["optim.lr=3e-4", "model.n_layer=2", "parallel.strategy=fsdp"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 7
    assert cfg.model == {"n_layer": 2}
    assert cfg.parallel.strategy == "fsdp"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optim.lr_typo=1"], "unknown config key 'optim.lr_typo'; known keys under optim: name, lr"),
        (["nosuchsection=1"], "unknown config key 'nosuchsection'"),
        (["parallel.strategy=zero3"], "parallel.strategy='zero3' is not allowed; choose one of: none, ddp, fsdp"),
        (["optim.lr=fast"], "optim.lr"),
        (["optim.name=adam"], "optim.name='adam' is not allowed"),
        (["data.batch_size=10", "data.grad_accum=3"], "data.batch_size=10 is not divisible by data.grad_accum=3"),
        (["early_stopping.patience=-1"], "early_stopping.patience=-1 must be"),
        (["early_stopping.mode=up"], "early_stopping.mode='up'"),
        (["train.max_steps=0"], "train.max_steps=0 must be > 0"),
        (["lr"], "must look like key=value"),
        # torch's own checks said these with a traceback and exit 1 (a launcher restarts that)
        (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5] must be a list of two numbers in [0, 1)"),
        (["optim.name=sgd", "optim.momentum=-1"], "optim.momentum=-1.0 must be a finite number >= 0"),
        (["dist.timeout_s=inf"], "dist.timeout_s=inf must be a finite number > 0"),
        # accepted, the lr then rose during the "decay" (and a negative one went below 0)
        (["scheduler.min_lr_ratio=1.5"], "scheduler.min_lr_ratio=1.5 must be in [0, 1]"),
        (["scheduler.min_lr_ratio=-0.1"], "scheduler.min_lr_ratio=-0.1 must be in [0, 1]"),
        (["scheduler.min_lr_ratio=nan"], "scheduler.min_lr_ratio=nan must be in [0, 1]"),
        # early stopping's own checks ran only once the process group had started
        (["early_stopping.enabled=true", "early_stopping.max_time=0"], "early_stopping.max_time=0.0 must be"),
        (["early_stopping.enabled=true", "early_stopping.baseline=nan"], "early_stopping.baseline=nan must be"),
        # was taken as the local directory ./s3:/b/run, checkpoints included (lost with the pod)
        (["run_dir=s3://b/run"], "run_dir='s3://b/run' is a URL, but run_dir is a local"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_unknown_key_in_yaml_names_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim.learning_rate.*bad.yaml"):
        load_config(f)


def test_a_bad_override_is_named_as_the_command_lines_not_the_files(tmp_path: Path) -> None:
    f = tmp_path / "good.yaml"
    f.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["optim.nme=x"])
    assert "unknown config key 'optim.nme'" in str(e.value)
    assert "(in the command-line overrides)" in str(e.value) and "good.yaml" not in str(e.value)
    with pytest.raises(ConfigError, match=r"optim.lr.*\(in the command-line overrides\)"):
        load_config(f, ["optim.lr=fast"])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)
    f.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_world_size_must_divide_batch() -> None:
    cfg = load_config(None, ["data.batch_size=64", "data.grad_accum=2"])
    check_world_size(cfg, 2)
    check_world_size(cfg, 4)
    with pytest.raises(ConfigError, match="not divisible by world size 3") as error:
        check_world_size(cfg, 3)
    assert "use a world size that divides 64" in str(error.value)
    # a resume on more ranks: the accumulation that keeps the global batch of 48 is named
    with pytest.raises(ConfigError, match=r"data.grad_accum=3 \(or another divisor of 6\) keeps the global batch"):
        check_world_size(load_config(None, ["data.batch_size=48", "data.grad_accum=4"]), 8)


def test_round_trip_through_dict_and_yaml() -> None:
    cfg = load_config(None, ["optim.lr=0.5", "checkpoint.storage_options.anon=true"])
    assert from_dict(to_dict(cfg)) == cfg
    assert "lr: 0.5" in to_yaml(cfg)
    assert cfg.checkpoint_root.endswith("runs/default/checkpoints")


def test_changes_lists_what_differs_and_which_values_the_optimizer_overrides() -> None:
    from dtrain.config import changes

    def cfg(**over: dict) -> dict:
        d = to_dict(JobConfig())
        for section, values in over.items():
            d[section] = {**d[section], **values} if isinstance(d[section], dict) else values
        return d

    saved = cfg(run_dir="a", optim={"lr": 0.001}, train={"max_steps": 10}, logging={"level": "INFO"})
    now = cfg(run_dir="b", optim={"lr": 0.001, "betas": [0.9, 0.95]}, train={"max_steps": 20},
              checkpoint={"storage_options": {"anon": True}}, logging={"level": "DEBUG"})
    assert changes(saved, now) == [
        "checkpoint.storage_options.anon: changed",
        "optim.betas: [0.9, 0.999] -> [0.9, 0.95] (not applied: the optimizer resumes with the checkpoint's value)",
        "train.max_steps: 10 -> 20",
    ]
    assert changes(saved, saved) == []
    older = cfg()  # a checkpoint of a dtrain without checkpoint.init_from: it counts as the default
    del older["checkpoint"]["init_from"]
    assert changes(older, cfg()) == []
    assert changes(older, cfg(checkpoint={"init_from": "s3://b/r"})) == ["checkpoint.init_from: '' -> 's3://b/r'"]


def test_checkpoints_and_the_run_dir_keep_the_config_without_storage_credentials(tmp_path: Path) -> None:
    """s3fs's options (key, secret, token, username, password; botocore's client_kwargs
    aws_access_key_id, aws_secret_access_key, aws_session_token; s3_additional_kwargs SSECustomerKey)
    are redacted in what dtrain writes; the access key id and SSE-C key were kept, and config.yaml in
    the run directory kept every one."""
    from dtrain.config import REDACTED, changes, saved_form

    cfg = JobConfig()
    cfg.checkpoint.storage_options = {
        "key": "AKIA1", "secret": "s3cr3t1", "token": "tok1", "username": None, "endpoint_url": "http://x", "anon": False,
        "client_kwargs": {"aws_access_key_id": "AKIA2", "aws_secret_access_key": "s3cr3t2",
                          "aws_session_token": "tok2", "region_name": "eu"},
        "s3_additional_kwargs": {"SSECustomerKey": "s3cr3t3", "SSECustomerAlgorithm": "AES256"}}
    opts = saved_form(cfg)["checkpoint"]["storage_options"]
    assert opts == {"key": REDACTED, "secret": REDACTED, "token": REDACTED, "username": None, "endpoint_url": "http://x",
                    "anon": False, "client_kwargs": {"aws_access_key_id": REDACTED, "aws_secret_access_key": REDACTED,
                                                     "aws_session_token": REDACTED, "region_name": "eu"},
                    "s3_additional_kwargs": {"SSECustomerKey": REDACTED, "SSECustomerAlgorithm": "AES256"}}
    written = to_yaml(cfg)
    assert not re.search(r"AKIA|s3cr3t|tok\d", written) and "region_name: eu" in written
    assert cfg.checkpoint.storage_options["secret"] == "s3cr3t1"  # the run itself keeps them
    assert changes(saved_form(cfg), saved_form(cfg)) == []
    rotated = JobConfig()
    rotated.checkpoint.storage_options = {**cfg.checkpoint.storage_options, "secret": "new", "token": "new"}
    older = to_dict(cfg)  # a checkpoint of a dtrain that kept them
    assert changes(saved_form(cfg), saved_form(rotated)) == [] and changes(older, saved_form(rotated)) == []
    # a copy of what dtrain wrote, used as a config: the placeholder is no credential
    (tmp_path / "copy.yaml").write_text(written)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "copy.yaml")
    assert str(e.value).startswith("checkpoint.storage_options.key, checkpoint.storage_options.secret, ")
    assert "'<redacted>' is the placeholder dtrain writes instead of a credential" in str(e.value)
    with pytest.raises(ConfigError, match="storage_options.client_kwargs.aws_access_key_id"):
        from_dict(saved_form(cfg))


def test_a_bad_value_exits_2_from_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 (a config error: launchers do not retry), before anything is written. Called from a
    program, main() leaves the caller's objects to the GC (only a process of its own freezes them)."""
    import gc

    from dtrain.cli import main

    frozen = gc.get_freeze_count()
    assert main(["train", "scheduler.min_lr_ratio=2", f"run_dir={tmp_path / 'run'}"]) == 2
    assert gc.get_freeze_count() == frozen and gc.isenabled()
    err = capsys.readouterr().err
    assert err.startswith("dtrain: config error: scheduler.min_lr_ratio=2.0 must be in [0, 1]"), err
    assert not (tmp_path / "run").exists()
