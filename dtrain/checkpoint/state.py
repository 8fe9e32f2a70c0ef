"""Get state out of, and back into, a model, its optimizers and the small stateful components.

Model and optimizer state go through torch.distributed.checkpoint.state_dict (`get_state_dict` /
`set_state_dict`): canonical FQN keys (no DDP `module.` prefix), DTensor shards under FSDP2, and
optimizer state keyed by FQN. Tensors go to safetensors; the rest (param_groups, scalar leaves,
component state_dicts, RNG, `extra`) becomes state.json through the strict JSON codec.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from dtrain import __version__
from dtrain.checkpoint.fill import check_keys
from dtrain.checkpoint.plan import Leaf, flatten
from dtrain.errors import CheckpointError, CheckpointMismatchError, DtrainError

log = logging.getLogger(__name__)
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def as_tuple(optimizer: Optimizers) -> tuple[torch.optim.Optimizer, ...]:
    if optimizer is None:
        return ()
    if isinstance(optimizer, torch.optim.Optimizer):
        return (optimizer,)
    return tuple(optimizer)


def check_targets(model: object, optimizers: tuple[object, ...], what: str) -> None:
    """What a user passes to save/load, checked before any collective: a module, optimizers, and
    optimizers over that module's own parameters (else torch's state-dict code fails with a bare
    KeyError deep inside)."""
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{what} needs model=<the torch.nn.Module itself>, got {type(model).__name__}"
                              + (" (a state dict? pass the module it came from)" if isinstance(model, dict) else ""))
    if not optimizers:
        return
    own = {id(p) for p in model.parameters()}
    for i, optim in enumerate(optimizers):
        if not isinstance(optim, torch.optim.Optimizer):
            raise CheckpointError(f"{what}: optimizer[{i}] is a {type(optim).__name__}, not a torch.optim.Optimizer "
                                  f"(a scheduler or other component goes in stateful={{'name': obj}})")
        foreign = sum(id(p) not in own for g in optim.param_groups for p in g["params"])
        if foreign:
            raise CheckpointError(f"{what}: optimizer[{i}] ({type(optim).__name__}) holds {foreign} parameter(s) that "
                                  f"are not parameters of the model passed ({type(model).__name__}): build the "
                                  f"optimizer from that model's parameters (model.parameters()), and pass the same "
                                  f"model (wrapped or not) to save and load")


def check_loadable(model: nn.Module, what: str) -> None:
    """A load copies into existing tensors; those of a model built on the meta device have no
    storage, and torch's copy into them silently does nothing."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_meta:
            raise CheckpointError(f"{what}: the model's tensor {name!r} is on the meta device, which a load cannot "
                                  f"fill; materialise the model first (model.to_empty(device=...)), then load")


def get_states(model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...], *, for_save: bool = False
               ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Model and optimizer state dicts whose tensors are this rank's shards (no copies).

    `get_state_dict` gives an empty optimizer its state with a zero-lr step over every parameter
    at once. Loading needs state tensors to fill (restore.init_optimizer_state makes them a bucket
    at a time first), but a save must neither change the run nor pay for that step (measured: 805
    MiB of temporaries for a 256 MiB model with AdamW; and an optimizer whose state appears early
    counts one step more, e.g. in Adam's bias correction): each optimizer that has not stepped yet
    gets one empty placeholder entry, which makes `get_state_dict` skip its initialisation, and is
    saved with its param_groups only and left exactly as it was, next to optimizers that have."""
    fresh = [o for o in optimizers if not o.state] if for_save else []
    for o in fresh:
        first = next((p for g in o.param_groups for p in g["params"]), None)
        if first is not None:
            o.state[first] = {}
    opts = StateDictOptions(full_state_dict=False, cpu_offload=False)
    try:
        model_sd, optim_sd = get_state_dict(model, optimizers, options=opts)
    finally:
        for o in fresh:
            o.state.clear()
    if fresh:  # the placeholders' entries (an optimizer with state has no empty entry to lose)
        kept: dict[str, Any] = optim_sd.get("state", {})  # type: ignore[assignment]
        optim_sd["state"] = {k: v for k, v in kept.items() if v}
    return model_sd, (optim_sd if optimizers else None)


def optimizer_fqns(optimizers: tuple[torch.optim.Optimizer, ...], optim_sd: dict[str, Any]) -> list[set[str]]:
    """The parameter FQNs of each optimizer: `get_state_dict` lists every optimizer's param_groups
    in order, each naming its parameters by FQN."""
    groups = optim_sd.get("param_groups", [])
    out, at = [], 0
    for o in optimizers:
        n = len(o.param_groups)
        out.append({str(f) for g in groups[at:at + n] for f in g.get("params", [])})
        at += n
    return out


def clear_optimizer_state(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Back to "never stepped" (loading a checkpoint saved before their first step)."""
    for o in optimizers:
        o.state.clear()


def strategy_of(model: nn.Module, world_size: int) -> str:
    """How the model is parallelised, for the manifest: fsdp, ddp or none."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "fsdp"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    return "none" if world_size == 1 else "replicated"


def versions() -> dict[str, str]:
    """dtrain's and torch's versions, for the manifest. From the modules, not package metadata:
    reading that took 3-4 ms inside a process's first save (pyproject takes dtrain's version
    from `dtrain.__version__`, so both agree)."""
    return {"dtrain": __version__, "torch": torch.__version__}


def json_state(leaves: dict[str, Leaf], optim_sd: dict[str, Any] | None) -> dict[str, Any]:
    """The non-tensor part of model/optimizer state, ready for the JSON codec."""
    return {
        "leaves": {k: leaf.value for k, leaf in leaves.items()},
        "param_groups": None if optim_sd is None else optim_sd.get("param_groups", []),
    }


def apply_json_state(saved: dict[str, Any], leaves: dict[str, Leaf], optim_sd: dict[str, Any] | None,
                     strict: bool, where: str) -> None:
    """Put saved non-tensor leaves and param_groups into the target state dicts in place."""
    stored = saved.get("leaves") or {}
    wanted = {k for k in leaves if optim_sd is not None or k.startswith("model/")}
    have = {k for k in stored if optim_sd is not None or k.startswith("model/")}
    if strict:
        check_keys(wanted, have, "non-tensor state", where)
    for k in wanted & have:
        leaves[k].container[leaves[k].subkey] = stored[k]
    if optim_sd is None:
        return
    groups = saved.get("param_groups")
    if groups is None:
        if strict:
            raise CheckpointMismatchError(f"{where}: the checkpoint has no optimizer state",
                                          "load without an optimizer or pass strict=False")
        return
    if strict:
        want = {p for g in optim_sd["param_groups"] for p in g["params"]}
        got = {p for g in groups for p in g.get("params", [])}
        check_keys(want, got, "optimizer param_groups parameter", where)
    check_param_groups(optim_sd["param_groups"], groups, where)
    optim_sd["param_groups"] = groups


def check_param_groups(current: list[dict[str, Any]], saved: list[dict[str, Any]], where: str) -> None:
    """Each of the optimizers' param groups must take its hyperparameters from exactly one saved
    group, and no saved group may feed two: torch's loader otherwise gives a split group its
    hyperparameters in one part only, and the other part is left without 'lr' (measured: a
    checkpoint of one group loaded into two)."""
    owner = {p: i for i, g in enumerate(saved) for p in g.get("params", [])}
    fed: dict[int, int] = {}
    for j, group in enumerate(current):
        if not group["params"]:
            continue  # an empty group: torch's loader pairs those itself
        sources = sorted({owner[p] for p in group["params"] if p in owner})
        if len(sources) == 1 and fed.setdefault(sources[0], j) == j:
            continue
        raise CheckpointMismatchError(
            f"{where}: the optimizer's param groups do not match the checkpoint's (it has {len(saved)} group(s) "
            f"of {[len(g.get('params', [])) for g in saved]} parameters, the optimizer {len(current)} of "
            f"{[len(g['params']) for g in current]}; group {j} holds {few_params(group['params'])})",
            "build the optimizer with the param groups it was saved with, or load without it (optimizer=None) to "
            "start it afresh")


def few_params(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def set_states(model: nn.Module, optimizers: tuple[torch.optim.Optimizer, ...], model_sd: dict[str, Any],
               optim_sd: dict[str, Any] | None, strict: bool) -> None:
    opts = StateDictOptions(strict=strict)
    if optimizers and optim_sd is not None:
        set_state_dict(model, optimizers, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
    else:
        set_model_state_dict(model, model_sd, options=opts)


def stateful_states(stateful: dict[str, Stateful]) -> dict[str, Any]:
    out = {}
    for name, obj in stateful.items():
        if not hasattr(obj, "state_dict"):
            raise CheckpointError(f"stateful[{name!r}] ({type(obj).__name__}) has no state_dict()")
        out[name] = obj.state_dict()
    return out


def load_stateful(stateful: dict[str, Stateful], saved: dict[str, Any], where: str) -> None:
    """Each component's saved state into it. One the checkpoint lacks keeps its state, with a warning:
    whether it may lack it (strict, optional) was checked before anything was loaded
    (restore._check_components)."""
    for name, obj in stateful.items():
        if name not in saved:
            log.warning("%s: no state for component %r; it keeps its current state", where, name)
            continue
        try:
            obj.load_state_dict(saved[name])
        except DtrainError:  # its own clear error (early stopping's monitor mismatch is a config error)
            raise
        except Exception as e:
            raise CheckpointError(f"{where}: stateful[{name!r}].load_state_dict failed ({type(e).__name__}: {e}); "
                                  f"the model and optimizer state were already loaded") from e


__all__ = ["Stateful", "as_tuple", "check_targets", "check_loadable", "check_param_groups", "get_states", "clear_optimizer_state", "optimizer_fqns", "flatten", "strategy_of", "versions", "json_state",
           "apply_json_state", "set_states", "stateful_states", "load_stateful"]
