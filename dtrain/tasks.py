"""The plug-in API: a `Task` bundles a model builder, dataset builders and the loss functions.

The trainer knows nothing about any model. It looks a task up by name (`get_task("digits")`, or
`get_task("mypkg.mymod:my_task")` for a user's own), builds its option dataclasses from the config
with `make_options`, and calls the task's functions. Built-in tasks: "digits" and "gpt".
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtrain.errors import ConfigError

if TYPE_CHECKING:  # torch only where a task is built or run: launch/torchrun.sh's check needs none
    import torch
    from torch import nn
    from torch.utils.data import Dataset

__all__ = ["Task", "register_task", "get_task", "task_options", "registered_names", "make_options", "to_device"]


def _no_blocks(model: nn.Module) -> list[nn.Module]:
    return []


@dataclass
class Task:
    """Everything the trainer needs to train one kind of model on one kind of data.

    - `model_config` / `data_config`: dataclasses with a default for every field; the job config's
      `model:` and `data:` sections are built into them with `make_options`.
    - `build_model(model_cfg) -> nn.Module`: called after the trainer seeded the RNGs.
    - `build_datasets(data_cfg, seed) -> (train, val)`: map-style datasets, identical on every rank.
    - `train_loss(model, batch) -> scalar`: mean loss of one micro-batch (already on the device).
    - `eval_per_sample(model, batch) -> {"loss": Tensor[B], "acc": Tensor[B], ...}`: one value per
      sample, so the trainer can drop padding and average over the whole validation set exactly;
      it reports each key as `val/<key>`.
    - `fsdp_blocks(model) -> [modules]`: submodules FSDP shards one by one before the root.
    """

    name: str
    model_config: type
    data_config: type
    build_model: Callable[[Any], nn.Module]
    build_datasets: Callable[[Any, int], tuple[Dataset, Dataset]]
    train_loss: Callable[[nn.Module, Any], torch.Tensor]
    eval_per_sample: Callable[[nn.Module, Any], dict[str, torch.Tensor]]
    fsdp_blocks: Callable[[nn.Module], list[nn.Module]] = _no_blocks

    def __post_init__(self) -> None:
        for field in ("model_config", "data_config"):
            cls = getattr(self, field)
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                raise ConfigError(f"task {self.name!r}: {field} must be a dataclass type, got {cls!r}")


# A registered name maps to a Task, or to "module:attr" for built-ins imported on first use
# (importing scikit-learn or reading the corpus should not slow down `dtrain --help`).
_REGISTRY: dict[str, Task | str] = {
    "digits": "dtrain.models.digits:TASK",
    "gpt": "dtrain.models.gpt:TASK",
}


def register_task(task: Task) -> Task:
    """Make `task` available to `get_task(task.name)` and configs (`task: <name>`); returns it."""
    if not isinstance(task, Task):
        raise ConfigError(f"register_task expects a dtrain.tasks.Task, got {type(task).__name__}")
    _REGISTRY[task.name] = task
    return task


# The option types of the built-in tasks, in a module without torch (dtrain.models.options)
_BUILTIN_OPTIONS = {"digits": ("DigitsModelConfig", "DigitsDataConfig"), "gpt": ("GPTModelConfig", "GPTDataConfig")}


def task_options(name: str) -> tuple[type, type]:
    """(model_config, data_config) of a task, without importing a built-in task's module (and torch)
    when it is not imported yet: enough to check a config's `model:` and `data:`."""
    if isinstance(_REGISTRY.get(name), str) and name in _BUILTIN_OPTIONS:
        from dtrain.models import options

        model, data = _BUILTIN_OPTIONS[name]
        return getattr(options, model), getattr(options, data)
    task = get_task(name)
    return task.model_config, task.data_config


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """A registered task by name, or a user's task by import path "package.module:attr".

    `attr` is a Task or a zero-argument callable returning one.
    """
    entry = _REGISTRY.get(name)
    if isinstance(entry, Task):
        return entry
    if entry is not None:
        task = _import_task(entry)
        _REGISTRY[name] = task
        return task
    if ":" in name:
        return _import_task(name)
    raise ConfigError(
        f"unknown task {name!r}: registered tasks are {registered_names()}; for your own task use "
        f"'package.module:attr' naming a Task (see examples/custom_task.py)"
    )


def _import_task(path: str) -> Task:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"task {path!r}: expected 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"task {path!r}: cannot import module {module_name!r} ({e})") from e
    if not hasattr(module, attr):
        raise ConfigError(f"task {path!r}: module {module_name!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    if not isinstance(obj, Task) and callable(obj):
        obj = obj()
    if not isinstance(obj, Task):
        raise ConfigError(
            f"task {path!r}: {attr} is a {type(obj).__name__}, expected a dtrain.tasks.Task or a "
            f"zero-argument function returning one"
        )
    return obj


def make_options(dc_type: type, options: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass `dc_type` from a plain dict, checking every key and value type.

    `where` names the config section in errors ("model", "data"). Ints are accepted for floats;
    nested dataclasses take nested dicts; Literal fields list their allowed values.
    """
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where} must be a mapping of options, got {type(options).__name__} {options!r}")
    options = dict(options)
    fields = {f.name: f for f in dataclasses.fields(dc_type) if f.init}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; allowed keys of {where}: {sorted(fields)}"
        )
    hints = typing.get_type_hints(dc_type)
    values = {key: _coerce(hints.get(key, Any), value, f"{where}.{key}") for key, value in options.items()}
    try:
        return dc_type(**values)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid {where} options {options}: {e}") from e


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Return `value` checked (and, for int->float and nested dataclasses, converted) against `tp`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r} matches none of {tp}: " + "; ".join(errors))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; allowed values: {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} options, got {value!r}")
        return make_options(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got the boolean {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move the tensors of a batch (tensor, tuple, list or dict, nested) to `device`."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
