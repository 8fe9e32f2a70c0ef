"""Built-in task "gpt": a small byte-level GPT on the Python standard library's own source files.

nanoGPT-shaped (token + position embeddings, pre-LayerNorm blocks of causal self-attention and MLP,
tied output head), small enough for CPU tests, and the model that exercises FSDP: `fsdp_blocks`
returns the transformer blocks. The corpus needs no download: a fixed, sorted list of `.py` files
from `sysconfig.get_paths()["stdlib"]` (or `data.corpus_dir`). Bytes are the tokens (vocab 256), so
the vocabulary is the same on every machine. The last `val_fraction` of the corpus is validation.
"""

from __future__ import annotations

import glob
import math
import os
import sysconfig

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from dtrain.errors import ConfigError
from dtrain.models.options import GPTDataConfig, GPTModelConfig
from dtrain.tasks import Task

VOCAB_SIZE = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_drop(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Maps byte ids [B, T] to next-byte logits [B, T, 256]."""

    def __init__(self, cfg: GPTModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(VOCAB_SIZE, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, VOCAB_SIZE, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: both live in the root FSDP unit
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections, scaled as in GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        if t > self.cfg.block_size:
            raise ConfigError(
                f"sequence of {t} tokens is longer than model.block_size={self.cfg.block_size}: "
                f"set data.block_size <= model.block_size"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.lm_head(self.ln_f(x))


def build_model(cfg: GPTModelConfig) -> nn.Module:
    if min(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) < 1:
        raise ConfigError(f"model sizes must be >= 1: {cfg}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"model.n_embd ({cfg.n_embd}) must be divisible by model.n_head ({cfg.n_head})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.dropout} must be in [0, 1)")
    return GPT(cfg)


def corpus_files(corpus_dir: str = "") -> list[str]:
    """The corpus's files in a fixed order: sorted top-level .py files of the directory."""
    root = corpus_dir or sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise ConfigError(f"no .py files in {root!r}: set data.corpus_dir to a directory of .py files")
    return files


def read_corpus(cfg: GPTDataConfig) -> torch.Tensor:
    """Up to `max_chars` bytes of the corpus as a uint8 tensor, files joined by a blank line."""
    chunks, total = [], 0
    for path in corpus_files(cfg.corpus_dir):
        with open(path, "rb") as f:
            data = f.read() + b"\n\n"
        chunks.append(data[: cfg.max_chars - total])
        total += len(chunks[-1])
        if total >= cfg.max_chars:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


class ByteWindows(Dataset):
    """(x, y) pairs of `block_size` bytes, y shifted by one, starting every `stride` bytes."""

    def __init__(self, data: torch.Tensor, block_size: int, stride: int) -> None:
        if len(data) < block_size + 1:
            raise ConfigError(
                f"a corpus part of {len(data)} bytes is too short for data.block_size={block_size}: "
                f"raise data.max_chars or lower data.block_size"
            )
        self.data = data
        self.block_size = block_size
        self.stride = stride
        self.n = (len(data) - block_size - 1) // stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range [0, {self.n})")
        start = i * self.stride
        chunk = self.data[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def build_datasets(cfg: GPTDataConfig, seed: int) -> tuple[ByteWindows, ByteWindows]:
    """(train, val) windows; the split is by position, so `seed` is not used."""
    data = read_corpus(cfg)
    n_train = int(len(data) * (1.0 - cfg.val_fraction))
    stride = cfg.stride or cfg.block_size
    return (
        ByteWindows(data[:n_train], cfg.block_size, stride),
        ByteWindows(data[n_train:], cfg.block_size, stride),
    )


def train_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def eval_per_sample(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per window: mean next-byte cross-entropy and next-byte accuracy."""
    x, y = batch
    logits = model(x).float()
    loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # [B, T]
    return {"loss": loss.mean(dim=1), "acc": (logits.argmax(dim=-1) == y).float().mean(dim=1)}


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.blocks) if isinstance(model, GPT) else []


TASK = Task(
    name="gpt",
    model_config=GPTModelConfig,
    data_config=GPTDataConfig,
    build_model=build_model,
    build_datasets=build_datasets,
    train_loss=train_loss,
    eval_per_sample=eval_per_sample,
    fsdp_blocks=fsdp_blocks,
)
