"""The options of the built-in tasks ("model:" and "data:" in a config), apart from their models:
launch/torchrun.sh checks a config before torchrun starts, and importing torch for that (the
models need it) added seconds to every start. dtrain.models.digits and .gpt use them from here."""

from __future__ import annotations

from dataclasses import dataclass

from dtrain.errors import ConfigError


@dataclass
class DigitsModelConfig:
    channels: int = 16  # first conv layer; the second has twice as many
    hidden: int = 128
    dropout: float = 0.0


@dataclass
class DigitsDataConfig:
    val_fraction: float = 0.2  # of all 1797 images, stratified by class
    train_fraction: float = 0.25  # of the rest; small on purpose so the model overfits (1.0 = all)
    split_seed: int = 0  # fixed split, independent of the run's seed

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"data.train_fraction={self.train_fraction} must be in (0, 1]")


@dataclass
class GPTModelConfig:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64  # longest sequence; must be >= data.block_size
    dropout: float = 0.0
    bias: bool = True
    activation_checkpointing: bool = False  # recompute each block in backward to save memory


@dataclass
class GPTDataConfig:
    block_size: int = 64  # tokens per training window
    stride: int = 0  # distance between window starts; 0 means block_size (no overlap)
    max_chars: int = 1_500_000  # bytes of corpus read, train + val
    val_fraction: float = 0.1  # the last part of the corpus, by position
    corpus_dir: str = ""  # directory of .py files; "" means the Python standard library

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.stride < 0 or self.max_chars < 1:
            raise ConfigError(
                f"data.block_size ({self.block_size}) and data.max_chars ({self.max_chars}) must be "
                f">= 1 and data.stride ({self.stride}) >= 0"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
