"""The task plug-in API and the two built-in tasks (digits CNN, byte-level GPT)."""

from __future__ import annotations

import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch.utils.data import default_collate

from dtrain.errors import ConfigError
from dtrain.models import digits, gpt
from dtrain.tasks import Task, get_task, make_options, register_task, registered_names, to_device


def collate(ds, indices: list[int]):  # type: ignore[no-untyped-def]
    return default_collate([ds[i] for i in indices])


@pytest.fixture(scope="module")
def digits_data() -> tuple:
    return digits.build_datasets(digits.DigitsDataConfig(), seed=0)


@pytest.fixture(scope="module")
def gpt_small_cfg() -> gpt.GPTDataConfig:
    return gpt.GPTDataConfig(block_size=16, max_chars=20_000)


@pytest.mark.parametrize("name", ["digits", "gpt"])
def test_builtin_task_builds_and_trains_one_step(name: str) -> None:
    task = get_task(name)
    assert task.name == name and name in registered_names()
    data_cfg = make_options(task.data_config, {"max_chars": 20_000} if name == "gpt" else {}, "data")
    train, val = task.build_datasets(data_cfg, 0)
    torch.manual_seed(0)
    model = task.build_model(make_options(task.model_config, {}, "model"))
    batch = to_device(collate(train, list(range(8))), "cpu")
    loss = task.train_loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        out = task.eval_per_sample(model.eval(), collate(val, list(range(5))))
    assert out["loss"].shape == (5,) and out["acc"].shape == (5,)
    assert out["loss"].mean().item() == pytest.approx(task.train_loss(model, collate(val, list(range(5)))).item(), rel=1e-5)


def test_digits_split_is_stratified_disjoint_and_fixed() -> None:
    from sklearn.datasets import load_digits

    labels = torch.tensor(load_digits().target)
    cfg = digits.DigitsDataConfig(train_fraction=1.0)
    train_idx, val_idx = digits.split_indices(labels, cfg)
    assert not set(train_idx) & set(val_idx)
    assert len(train_idx) + len(val_idx) == len(labels)
    assert len(val_idx) == pytest.approx(0.2 * len(labels), abs=1)
    overall, in_val = Counter(labels.tolist()), Counter(labels[val_idx].tolist())
    for cls in range(10):  # each class in the same proportion, up to rounding
        assert abs(in_val[cls] - 0.2 * overall[cls]) <= 1
    assert digits.split_indices(labels, cfg) == (train_idx, val_idx)
    other = digits.split_indices(labels, digits.DigitsDataConfig(train_fraction=1.0, split_seed=1))
    assert other[1] != val_idx

    small_train, small_val = digits.split_indices(labels, digits.DigitsDataConfig())
    assert small_val == val_idx, "train_fraction must not change the validation set"
    assert set(small_train) < set(train_idx) and len(small_train) == pytest.approx(0.25 * len(train_idx), abs=1)
    per_class = Counter(labels[small_train].tolist())
    assert min(per_class.values()) >= 30


def test_digits_datasets_are_deterministic_and_normalised(digits_data: tuple) -> None:
    train, val = digits_data
    again_train, again_val = digits.build_datasets(digits.DigitsDataConfig(), seed=123)
    assert torch.equal(train.tensors[0], again_train.tensors[0])
    assert torch.equal(val.tensors[1], again_val.tensors[1])
    x = train.tensors[0]
    assert x.shape[1:] == (1, 8, 8)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5) and x.std().item() == pytest.approx(1.0, abs=1e-4)


def test_gpt_windows_are_slices_of_the_corpus(gpt_small_cfg: gpt.GPTDataConfig) -> None:
    corpus = gpt.read_corpus(gpt_small_cfg)
    assert len(corpus) == 20_000
    first_file = Path(gpt.corpus_files()[0]).read_bytes()
    assert bytes(corpus[:100].tolist()) == first_file[:100]
    train, val = gpt.build_datasets(gpt_small_cfg, seed=0)
    assert len(train) == (18_000 - 17) // 16 + 1 and len(val) == (2_000 - 17) // 16 + 1
    for ds, offset in ((train, 0), (val, 18_000)):
        for i in (0, len(ds) // 2, len(ds) - 1):
            x, y = ds[i]
            start = offset + i * 16
            assert x.tolist() == corpus[start : start + 16].tolist()
            assert y.tolist() == corpus[start + 1 : start + 17].tolist()
    with pytest.raises(IndexError):
        train[len(train)]
    train2, _ = gpt.build_datasets(gpt_small_cfg, seed=5)
    assert torch.equal(train2[7][0], train[7][0])
    overlapping, _ = gpt.build_datasets(gpt.GPTDataConfig(block_size=16, stride=4, max_chars=20_000), 0)
    assert torch.equal(overlapping[4][0], train[1][0])


def test_gpt_blocks_checkpointing_and_block_size_guard() -> None:
    torch.manual_seed(0)
    cfg = gpt.GPTModelConfig(n_layer=3, block_size=16)
    model = gpt.build_model(cfg)
    blocks = gpt.fsdp_blocks(model)
    assert len(blocks) == 3 and all(isinstance(b, gpt.Block) for b in blocks)
    assert model.lm_head.weight is model.wte.weight
    x = torch.randint(0, 256, (2, 16))
    ckpt_model = gpt.build_model(gpt.GPTModelConfig(n_layer=3, block_size=16, activation_checkpointing=True))
    ckpt_model.load_state_dict(model.state_dict())
    for m in (model, ckpt_model):
        gpt.train_loss(m, (x, x)).backward()
    for (name, a), b in zip(model.named_parameters(), ckpt_model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    with pytest.raises(ConfigError, match="data.block_size <= model.block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ConfigError, match="divisible by model.n_head"):
        gpt.build_model(gpt.GPTModelConfig(n_embd=30, n_head=4))


@dataclass
class Inner:
    depth: int = 1


@dataclass
class Opts:
    width: int = 8
    lr: float = 0.1
    name: str = "a"
    act: Literal["relu", "gelu"] = "relu"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_make_options_builds_and_converts() -> None:
    opts = make_options(Opts, {"width": 4, "lr": 1, "act": "gelu", "sizes": [3], "limit": None, "inner": {"depth": 2}}, "model")
    assert opts == Opts(width=4, lr=1.0, act="gelu", sizes=[3], limit=None, inner=Inner(2))
    assert isinstance(opts.lr, float)
    assert make_options(Opts, None, "model") == Opts()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"widht": 4}, r"unknown key model\.widht; allowed keys of model: \['act', 'inner', 'limit'"),
        ({"width": "4"}, r"model\.width must be int, got str '4'"),
        ({"width": True}, r"model\.width must be a number, got the boolean True"),
        ({"act": "tanh"}, r"model\.act='tanh' is not allowed; allowed values: \['relu', 'gelu'\]"),
        ({"sizes": [1, "x"]}, r"model\.sizes\[1\] must be int"),
        ({"inner": {"deep": 1}}, r"unknown key model\.inner\.deep"),
        ({"limit": 1.5}, r"model\.limit=1\.5 matches none of"),
    ],
)
def test_make_options_errors_name_the_key(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_options(Opts, options, "model")


def test_builtin_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"data\.val_fraction=1\.5"):
        make_options(digits.DigitsDataConfig, {"val_fraction": 1.5}, "data")
    with pytest.raises(ConfigError, match=r"unknown key data\.n_layer"):
        make_options(gpt.GPTDataConfig, {"n_layer": 2}, "data")


def test_get_task_imports_module_attr_and_callables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_user_tasks.py").write_text(textwrap.dedent("""
        from dtrain.models import digits
        from dtrain.tasks import Task

        MINE = Task("mine", digits.DigitsModelConfig, digits.DigitsDataConfig, digits.build_model,
                    digits.build_datasets, digits.train_loss, digits.eval_per_sample)

        def make():
            return MINE

        NOT_A_TASK = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert get_task("my_user_tasks:MINE").name == "mine"
        assert get_task("my_user_tasks:make").name == "mine"
        with pytest.raises(ConfigError, match="NOT_A_TASK is a int, expected a dtrain.tasks.Task"):
            get_task("my_user_tasks:NOT_A_TASK")
        with pytest.raises(ConfigError, match="has no attribute 'missing'"):
            get_task("my_user_tasks:missing")
    finally:
        sys.modules.pop("my_user_tasks", None)
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        get_task("no_such_module_xyz:TASK")


def test_unknown_task_lists_registered_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'digts': registered tasks are \[.*'digits', 'gpt'"):
        get_task("digts")


def test_register_task_makes_it_available_by_name() -> None:
    task = Task("test-registered", digits.DigitsModelConfig, digits.DigitsDataConfig, digits.build_model,
                digits.build_datasets, digits.train_loss, digits.eval_per_sample)
    assert register_task(task) is task
    assert get_task("test-registered") is task
    with pytest.raises(ConfigError, match="model_config must be a dataclass type"):
        Task("bad", dict, digits.DigitsDataConfig, digits.build_model, digits.build_datasets,
             digits.train_loss, digits.eval_per_sample)


def test_to_device_walks_nested_batches() -> None:
    batch = {"x": torch.ones(2), "pair": (torch.zeros(1), [torch.ones(1), 5]), "tag": "t"}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta" and moved["pair"][1][0].device.type == "meta"
    assert isinstance(moved["pair"], tuple) and moved["pair"][1][1] == 5 and moved["tag"] == "t"


@pytest.mark.timeout(180)
def test_digits_defaults_learn_fast_then_overfit(digits_data: tuple) -> None:
    """The demo relies on this: >90% val accuracy within 300 steps, then val/loss rising again."""
    train, val = digits_data
    torch.manual_seed(0)
    model = digits.build_model(digits.DigitsModelConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    curve = []
    for step in range(1, 701):
        loss = digits.train_loss(model, train[torch.randint(len(train), (64,), generator=gen)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                out = digits.eval_per_sample(model.eval(), val[:])
            model.train()
            curve.append((step, out["loss"].mean().item(), out["acc"].mean().item()))
    assert max(acc for step, _, acc in curve if step <= 300) > 0.9
    best_step, best_loss, _ = min(curve, key=lambda c: c[1])
    assert best_step <= 400, curve
    assert curve[-1][1] > 1.05 * best_loss, curve


def test_custom_task_example_registers_a_working_task() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "custom_task.py"
    spec = importlib.util.spec_from_file_location("custom_task_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        task = get_task("spirals")
        assert task is module.TASK
        train, val = task.build_datasets(make_options(task.data_config, {"n_train": 256}, "data.options"), 0)
        again, _ = task.build_datasets(make_options(task.data_config, {"n_train": 256}, "data.options"), 9)
        assert len(train) == 256 and len(val) == 600 and torch.equal(train.tensors[0], again.tensors[0])
        model = task.build_model(make_options(task.model_config, {"hidden": 16}, "model"))
        task.train_loss(model, train[:32]).backward()
        assert task.eval_per_sample(model, val[:7])["acc"].shape == (7,)
        assert any(o.startswith("task=spirals") for o in module.DEFAULTS)
        # data.options.n_classes=5 made labels the 3-way output layer cannot score (IndexError
        # mid-training): a class count is refused up front, or the model follows it
        try:
            five = make_options(task.data_config, {"n_classes": 5, "n_train": 256}, "data.options")
        except ConfigError:
            pass
        else:
            task.train_loss(model, task.build_datasets(five, 0)[0][:256])
    finally:
        sys.modules.pop(spec.name, None)
