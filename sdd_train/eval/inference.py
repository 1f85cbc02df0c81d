"""Load a trained model and its tokenizer for inference from a run directory, a checkpoint or an export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdd_train.checkpoint import checkpoint_config, read_model_state, resolve_checkpoint, verified
from sdd_train.config import RunConfig, load_config
from sdd_train.data.dataset import PreparedDataset
from sdd_train.data.run_data import open_run_data
from sdd_train.data.tokenizer import Tokenizer
from sdd_train.distributed.world import World
from sdd_train.exit_codes import UsageError
from sdd_train.model import Transformer

TOKENIZER_FILE = "tokenizer.model"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    cfg: RunConfig
    source: Path  # the checkpoint or export folder the weights came from


# Offline tools (evaluation, generation, reports) run in one process on the CPU side.
LOCAL_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def local_run_data(cfg: RunConfig) -> tuple[list[PreparedDataset], list[str]]:
    """A run's training datasets and their names, opened quietly in this one process."""
    return open_run_data(cfg, log=lambda *a, **k: None)


def run_tokenizer(cfg: RunConfig) -> Tokenizer:
    """The tokenizer a run trained with (its first dataset's; the stdlib corpus is rebuilt if not cached)."""
    return local_run_data(cfg)[0][0].tokenizer


def load_exported(folder: Path, device: str = "cpu") -> torch.nn.Module:
    """Rebuild the :class:`Transformer` of an exported folder."""
    from safetensors.torch import load_file

    cfg = load_config(Path(folder) / "config.yaml")
    model = Transformer(cfg.model)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors"), device=device))
    return model.to(device)


def load_model(path: str | Path, step: int | None = None, device: str = "cpu") -> LoadedModel:
    """``path``: a run directory (latest checkpoint, or ``step``), one checkpoint directory, or an
    ``sdd-export`` folder. The model is returned in eval mode, fp32, on ``device``. A checkpoint is
    verified against its manifest first: a corrupt one is a one-line UsageError naming the file. It is
    rebuilt from the config it was written with (its meta.json), not the run's latest config.yaml."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        cfg = load_config(path / "config.yaml")
        model = load_exported(path)
        tokenizer = Tokenizer(path / TOKENIZER_FILE) if (path / TOKENIZER_FILE).is_file() else run_tokenizer(cfg)
        source = path
    else:
        if (path / "meta.json").is_file():  # RUN/checkpoints/step_N
            source = verified(path)
        elif (path / "config.yaml").is_file():
            source = verified(resolve_checkpoint(path, step))
        else:
            raise UsageError(f"{path}: not a run directory, a checkpoint or an sdd-export folder")
        cfg = checkpoint_config(source)
        model = Transformer(cfg.model)
        model.load_state_dict(read_model_state(source))
        tokenizer = run_tokenizer(cfg)
    return LoadedModel(model.to(device).eval(), tokenizer, cfg, source)
