"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), and their export.

Model and optimiser state go through DCP: every rank writes its own part
(``dcp/__<rank>_0.distcp``; rank 0 adds ``dcp/.metadata``), holding its FSDP2
/ tensor-parallel shards as they are, with no gather. Keys are parameter names
(``get_state_dict``), and DCP reshards on load, so a checkpoint written by N
workers in one layout (DDP, FSDP2, dp x tp) loads on M workers in another.
Unsharded (DDP) state is the same on every rank and DCP writes each tensor once.

Export builds the model from the checkpoint's ``config.json`` in one process,
reads the full weights from the DCP files into it (the only place they are
ever whole) and writes a safetensors folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

DCP_DIR = "dcp"
AUTO_CLASSES = {"ForSequenceClassification": "AutoModelForSequenceClassification",
                "ForQuestionAnswering": "AutoModelForQuestionAnswering"}


class MissingStateError(KeyError):
    """A sharded checkpoint lacks state that the model (or optimiser) being restored has."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_sharded_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / DCP_DIR / ".metadata").is_file()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    # get_state_dict creates the (lazily built) AdamW moments first, so there is state to load into.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write model and optimiser state under ``folder/dcp``; collective: every rank calls it, each writes its part."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(_state(model, optimizer), checkpoint_id=str(Path(folder) / DCP_DIR), no_dist=not _distributed())


def saved_keys(folder: str | Path) -> set[str]:
    """The flattened state keys (``model.<parameter>``, ``optimizer.state.<parameter>.exp_avg``, ...) saved in ``folder``."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(Path(folder) / DCP_DIR)).read_metadata().state_dict_metadata)


def load_sharded(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Restore ``model`` (and ``optimizer``) from ``folder/dcp``, resharded to this run's layout; collective.

    Raises :class:`MissingStateError` naming the first model parameter the checkpoint lacks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _state(model, optimizer)
    keys = saved_keys(folder)
    missing = sorted(name for name in state["model"] if f"model.{name}" not in keys)
    if missing:
        raise MissingStateError(f"checkpoint lacks {len(missing)} parameter(s) of this model (first: {missing[0]})")
    with warnings.catch_warnings():
        # One process (export, a 1-worker run) is meant: torch warns it assumes so.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(Path(folder) / DCP_DIR), no_dist=not _distributed())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def export_weights(folder: str | Path, destination: str | Path) -> Path:
    """Write the full model of the sharded checkpoint ``folder`` to ``destination`` with ``save_pretrained``.

    One process, no process group: the model is built from the checkpoint's
    ``config.json`` (the transformers class it names; no remote code) and filled
    from the DCP files, tied weights re-tied, then saved as safetensors.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    architecture = (config.architectures or ["ForCausalLM"])[0]
    auto_name = next((auto for suffix, auto in AUTO_CLASSES.items() if architecture.endswith(suffix)),
                     "AutoModelForCausalLM")
    model = getattr(transformers, auto_name).from_config(config)
    load_sharded(folder, model, None)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    model.save_pretrained(str(destination), safe_serialization=True)
    return Path(destination)
