"""Typed job configuration: one dataclass per component, composed into JobConfig.

YAML files and `key=value` command-line overrides are merged by OmegaConf onto the dataclass
schema, so an unknown key or a value of the wrong type is caught before any process group starts.
Value checks that a type cannot express (allowed names, ranges) live in `validate`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain.errors import ConfigError


@dataclass
class DataConfig:
    batch_size: int = 64  # global batch per optimizer step, over all ranks and accumulation steps
    grad_accum: int = 1
    eval_batch_size: int = 256  # per rank
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # checked against the task's data dataclass


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class SchedulerConfig:
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio


@dataclass
class TrainConfig:
    max_steps: int = 1000
    eval_every: int = 100
    log_every: int = 10
    deterministic: bool = True  # torch.use_deterministic_algorithms on CPU
    autocast: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    max_time: float = 0.0  # wall-clock budget in seconds, 0 = none
    # validation batches run at every start, before the first step: a crashing eval_per_sample or a
    # wrong early_stopping.monitor fails there, not at the first evaluation hours later; 0 = off
    sanity_eval_batches: int = 1


@dataclass
class ParallelConfig:
    strategy: str = "ddp"  # none | ddp | fsdp
    mixed_precision: str = "auto"  # auto (bf16 params + fp32 reduce on CUDA) | bf16 | off
    reshard_after_forward: bool = True


@dataclass
class DistConfig:
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 300.0


@dataclass
class CheckpointConfig:
    root: str = ""  # any fsspec URL; empty = <run_dir>/checkpoints
    every_steps: int = 0  # 0 = only at eval/end/stop
    every_minutes: float = 0.0
    on_eval: bool = True  # save after every evaluation (what keep_best_k and restore_best use)
    async_save: bool = False
    keep_last_n: int = 3
    keep_best_k: int = 1
    keep_every_n_steps: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)
    # one job per checkpoint root: a lease file names the job that writes there (checkpoint/lease.py)
    lease: bool = True
    lease_ttl_s: float = 60.0  # a crashed job's lease expires this long after its last renewal
    job_id: str = ""  # "" = DTRAIN_JOB_ID, torchrun's run id or SLURM_JOB_ID from the environment
    check_finite: bool = False  # loads refuse NaN/inf tensors and fall back to the previous checkpoint
    # fine-tuning: a fresh run's model weights come from this checkpoint (directory or root); ignored
    # once the run has checkpoints of its own (a restart resumes from those)
    init_from: str = ""
    init_strict: bool = True  # false: load the tensors both have (a new head), log the rest


@dataclass
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: str = "val/loss"
    mode: str = "min"
    min_delta: float = 0.0
    patience: int = 3
    baseline: float | None = None
    start_from_step: int = 0
    check_finite: bool = True
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None
    max_time: float | None = None
    restore_best: bool = True


@dataclass
class LoggingConfig:
    level: str = "INFO"
    progress: bool = True
    tensorboard: bool = False


@dataclass
class JobConfig:
    run_dir: str = "runs/default"
    task: str = "digits"  # a registered task name or "package.module:attr"
    seed: int = 0
    resume: str = "auto"  # auto | never | <checkpoint URL>
    model: dict[str, Any] = field(default_factory=dict)  # checked against the task's model dataclass
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: dict[str, Any] = field(default_factory=dict)  # fault injection, tests only

    @property
    def checkpoint_root(self) -> str:
        return self.checkpoint.root or str(Path(self.run_dir) / "checkpoints")


_CHOICES: dict[str, tuple[str, ...]] = {
    "optim.name": ("adamw", "sgd"),
    "scheduler.decay": ("cosine", "linear", "constant"),
    "train.autocast": ("auto", "bf16", "off"),
    "parallel.strategy": ("none", "ddp", "fsdp"),
    "parallel.mixed_precision": ("auto", "bf16", "off"),
    "dist.backend": ("auto", "gloo", "nccl"),
    "early_stopping.mode": ("min", "max"),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}

_NON_NEGATIVE = (
    "data.grad_accum", "data.num_workers", "optim.lr", "optim.weight_decay", "optim.momentum", "optim.grad_clip",
    "scheduler.warmup_steps", "train.max_time", "checkpoint.every_steps",
    "checkpoint.every_minutes", "checkpoint.keep_last_n", "checkpoint.keep_best_k",
    "checkpoint.keep_every_n_steps", "early_stopping.patience", "early_stopping.min_delta",
    "early_stopping.start_from_step", "train.sanity_eval_batches",
)
_POSITIVE = ("data.batch_size", "data.grad_accum", "data.eval_batch_size", "train.max_steps",
             "train.eval_every", "train.log_every", "dist.timeout_s", "checkpoint.lease_ttl_s")


def _get(cfg: JobConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: JobConfig) -> JobConfig:
    """Check values a type cannot express; every message names the key and what is allowed."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    for key in _POSITIVE:
        value = _get(cfg, key)
        if not value > 0:
            raise ConfigError(f"{key}={value!r} must be > 0")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number > 0")
    for key in _NON_NEGATIVE:
        value = _get(cfg, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{key}={value!r} must be a finite number >= 0")
    ratio = cfg.scheduler.min_lr_ratio
    if not 0.0 <= ratio <= 1.0:  # NaN fails too; above 1 the lr would rise while it "decays"
        raise ConfigError(f"scheduler.min_lr_ratio={ratio!r} must be in [0, 1]: the final lr is optim.lr x "
                          f"min_lr_ratio (above 1 the lr would rise during the decay)")
    if cfg.data.batch_size % cfg.data.grad_accum:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by data.grad_accum={cfg.data.grad_accum}"
        )
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas!r} must be a list of two numbers in [0, 1), "
                          "e.g. [0.9, 0.999]")
    if cfg.early_stopping.enabled:  # its own checks (thresholds, max_time), before any process group starts
        from dtrain.early_stopping import EarlyStopping

        EarlyStopping.from_config(cfg.early_stopping)
    placeholders = redacted_keys(cfg.checkpoint.storage_options)
    if placeholders:
        raise ConfigError(f"{', '.join(placeholders)}: {REDACTED!r} is the placeholder dtrain writes instead of a "
                          f"credential (<run_dir>/config.yaml, a checkpoint's config); set the real value, or remove "
                          f"the key to take credentials from the AWS_* environment")
    if not cfg.run_dir:
        raise ConfigError("run_dir is empty; set run_dir=<directory for logs, metrics and checkpoints>")
    if "://" in cfg.run_dir:
        # It was taken as a local path: `s3://b/x` became the directory ./s3:/b/x, checkpoints included.
        raise ConfigError(
            f"run_dir={cfg.run_dir!r} is a URL, but run_dir is a local (or shared-filesystem) directory for "
            f"logs, metrics and exit records; keep it local and put the checkpoints in the bucket with "
            f"checkpoint.root={cfg.run_dir.rstrip('/')}/checkpoints"
        )
    return cfg


def check_world_size(cfg: JobConfig, world_size: int) -> None:
    """The global batch must split evenly over ranks and accumulation steps, and strategy `none`
    trains one process (checked here too, before any process group, not only when the model is wrapped)."""
    if cfg.parallel.strategy == "none" and world_size > 1:
        raise ConfigError(f"parallel.strategy='none' trains one process, but this job has {world_size} ranks; "
                          "use parallel.strategy=ddp or fsdp")
    batch, accum = cfg.data.batch_size, cfg.data.grad_accum
    per_step = world_size * accum
    if batch % per_step:
        # A run resumed on another world size keeps its sample order only with the same global batch:
        # say which accumulation keeps it before suggesting another batch size.
        if batch % world_size == 0:
            per_rank = batch // world_size
            keep = max(g for g in range(1, accum + 1) if per_rank % g == 0)
            hint = f"data.grad_accum={keep} (or another divisor of {per_rank}) keeps the global batch on {world_size} ranks"
        else:
            hint = f"no data.grad_accum splits it over {world_size} ranks: use a world size that divides {batch}"
        raise ConfigError(
            f"data.batch_size={batch} is not divisible by world size {world_size} x data.grad_accum={accum} = "
            f"{per_step}; data.batch_size is the global batch (a resumed run keeps its sample order only with "
            f"the same one): {hint}, or pick a data.batch_size that is a multiple of {per_step}"
        )


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(e).splitlines()[0]
    if type(e).__name__ == "ConfigKeyError" and key:
        parent = str(key).rpartition(".")[0]
        node: Any = JobConfig()
        for part in parent.split(".") if parent else []:
            node = getattr(node, part, None)
        allowed = [f.name for f in fields(node)] if is_dataclass(node) else []
        hint = f"; known keys{' under ' + parent if parent else ''}: {', '.join(allowed)}" if allowed else ""
        return f"unknown config key {key!r}{hint}"
    return f"{key}: {msg}" if key else msg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """YAML file (optional) + `key=value` overrides -> validated JobConfig."""
    schema = OmegaConf.structured(JobConfig)
    layers: list[Any] = [schema]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass --config <path to a YAML file>")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, not {type(data).__name__}")
        layers.append(OmegaConf.create(data))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=3e-4")
    # The file first, then the overrides: an error names where the bad key is (a typo on the command
    # line was reported as being in the config file).
    where = f" (in {path})" if path else ""
    try:
        merged = OmegaConf.merge(*layers)
        if overrides:
            where = " (in the command-line overrides)"
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
            where = f" (in {path} or the command-line overrides)" if path else where  # e.g. an interpolation
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e) + where) from None
    assert isinstance(cfg, JobConfig)
    return validate(cfg)


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    """Plain dict of a config (JSON/YAML-safe)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


# an optimizer's state_dict carries these in its param_groups, so a resume restores the saved values
RESTORED_BY_OPTIMIZER = ("optim.lr", "optim.weight_decay", "optim.betas", "optim.momentum")
_HOW_TO_RUN = ("run_dir", "resume", "logging.", "faults.", "train.sanity_eval_batches")  # keys that say how to run, not what to train
_SECRET = ("checkpoint.storage_options.",)  # may hold credentials: named, values not shown


def changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's config and this run's, one `key: old -> new` line per
    key (dotted), for the warning a resume gives; keys about how to run are left out. A key the
    saved config lacks (an older dtrain's) counts as its default."""
    # both redacted: a checkpoint of an older dtrain kept credentials, and new ones must not count as changes
    old = {**_dotted(to_dict(JobConfig())), **_dotted(_redact_storage(saved))}
    new = _dotted(_redact_storage(now))
    out = []
    for key in sorted(old.keys() | new.keys()):
        if key.startswith(_HOW_TO_RUN) or old.get(key) == new.get(key):
            continue
        note = " (not applied: the optimizer resumes with the checkpoint's value)" \
            if key in RESTORED_BY_OPTIMIZER else ""
        shown = " changed" if key.startswith(_SECRET) else f" {_shown(old, key)} -> {_shown(new, key)}"
        out.append(f"{key}:{shown}{note}")
    return out


def _shown(d: dict[str, Any], key: str) -> str:
    return repr(d[key]) if key in d else "(absent)"


def _dotted(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaves under dotted keys (an empty dict has none)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Option names that hold credentials, matched on the lower-case name without "_" and "-": s3fs's
# key/secret/token/username/password, botocore's aws_access_key_id/aws_secret_access_key/
# aws_session_token (client_kwargs), SSECustomerKey (s3_additional_kwargs), other stores' account_key,
# sas_token, connection_string, credentials.
_CREDENTIAL = re.compile(r".*(key|keyid)|.*(secret|token|passw(or)?d|credential|connectionstring).*|username|sas")
REDACTED = "<redacted>"


def is_credential(name: str) -> bool:
    return _CREDENTIAL.fullmatch(name.lower().replace("_", "").replace("-", "")) is not None


def saved_form(cfg: JobConfig) -> dict[str, Any]:
    """The config as dtrain writes it (checkpoints, `<run_dir>/config.yaml`): credentials in
    `checkpoint.storage_options` (`is_credential`) are replaced by REDACTED at any depth, since run
    directories and checkpoints get copied and shared; an endpoint or a region stays. The running
    job keeps the real values (`cfg` is not changed), and nothing reads them back from these copies."""
    return _redact_storage(to_dict(cfg))


def _redact_storage(d: dict[str, Any]) -> dict[str, Any]:
    ck = d.get("checkpoint")
    if isinstance(ck, dict) and isinstance(ck.get("storage_options"), dict):
        d = {**d, "checkpoint": {**ck, "storage_options": _redact(ck["storage_options"])}}
    return d


def _redact(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: REDACTED if is_credential(str(k)) and x not in (None, "") else _redact(x) for k, x in v.items()}
    return v


def redacted_keys(options: dict[str, Any], prefix: str = "checkpoint.storage_options") -> list[str]:
    """Dotted keys whose value is REDACTED: a config copied from one dtrain wrote, whose credentials
    it left out."""
    out = []
    for k, v in options.items():
        if isinstance(v, dict):
            out += redacted_keys(v, f"{prefix}.{k}")
        elif v == REDACTED:
            out.append(f"{prefix}.{k}")
    return out


def to_yaml(cfg: JobConfig) -> str:
    """The config as YAML, credentials redacted (`saved_form`): what `<run_dir>/config.yaml` holds."""
    return yaml.safe_dump(saved_form(cfg), sort_keys=False)


def from_dict(data: dict[str, Any]) -> JobConfig:
    """Inverse of `to_dict`; a redacted copy (`saved_form`) is refused, naming its REDACTED keys."""
    merged = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.create(data))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, JobConfig)
    return validate(cfg)


