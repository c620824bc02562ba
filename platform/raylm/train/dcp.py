"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), and their export.

Model and optimiser state go through DCP: every rank writes its own part
(``dcp/__<rank>_0.distcp``; rank 0 adds ``dcp/.metadata``), holding its FSDP2
/ tensor-parallel shards as they are, with no gather. Keys are parameter names
(``get_state_dict``), and DCP reshards on load, so a checkpoint written by N
workers in one layout (DDP, FSDP2, dp x tp) loads on M workers in another.
Unsharded (DDP) state is the same on every rank and DCP writes each tensor once.

A LoRA run (``trainable_only``) saves and restores only the parameters that
train, the adapter matrices, with their optimiser state
(``StateDictOptions(ignore_frozen_params=True)``): the frozen base comes from
``model.init_from`` on every start and is never gathered or written.

Export builds the model from the checkpoint's ``config.json`` in one process,
reads the full weights from the DCP files into it (the only place they are
ever whole) and writes a safetensors folder; an adapter checkpoint's tensors
are read as they are (:func:`read_model_state`), with no model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

DCP_DIR = "dcp"
# Module names that torch.compile and activation checkpointing insert, which state-dict names leave out.
WRAPPER_PREFIXES = ("_orig_mod", "_checkpoint_wrapped_module")
AUTO_CLASSES = {"ForSequenceClassification": "AutoModelForSequenceClassification",
                "ForQuestionAnswering": "AutoModelForQuestionAnswering"}


class MissingStateError(KeyError):
    """A sharded checkpoint lacks state that the model (or optimiser) being restored has."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_sharded_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / DCP_DIR / ".metadata").is_file()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool = False) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(ignore_frozen_params=trainable_only)
    if optimizer is None:
        state = {"model": get_model_state_dict(model, options=options)}
    else:
        # get_state_dict creates the (lazily built) AdamW moments first, so there is state to load into.
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        state = {"model": model_state, "optimizer": optimizer_state}
    if trainable_only:
        # torch drops each frozen parameter under one name: a tied copy (lm_head of a tied embedding) stays.
        frozen = _frozen_names(model)
        state["model"] = {name: value for name, value in state["model"].items() if name not in frozen}
    return state


def _frozen_names(model: torch.nn.Module) -> set[str]:
    """Every state-dict name of a frozen parameter, tied copies included, without wrapper prefixes."""
    names = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            parts = name.split(".")
            parts = parts[1:] if parts[0] == "module" else parts  # DDP
            names.add(".".join(part for part in parts if part not in WRAPPER_PREFIXES))
    return names


def save_sharded(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 trainable_only: bool = False) -> None:
    """Write model and optimiser state under ``folder/dcp``; collective: every rank calls it, each writes its part.

    ``trainable_only``: the model state is the parameters that train (LoRA's adapters), not the frozen rest.
    """
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(_state(model, optimizer, trainable_only), checkpoint_id=str(Path(folder) / DCP_DIR),
                 no_dist=not _distributed())


def saved_keys(folder: str | Path) -> set[str]:
    """The flattened state keys (``model.<parameter>``, ``optimizer.state.<parameter>.exp_avg``, ...) saved in ``folder``."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(Path(folder) / DCP_DIR)).read_metadata().state_dict_metadata)


def load_sharded(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 trainable_only: bool = False) -> None:
    """Restore ``model`` (and ``optimizer``) from ``folder/dcp``, resharded to this run's layout; collective.

    ``trainable_only``: restore the parameters that train and leave the frozen ones as they are.
    Raises :class:`MissingStateError` naming the first model parameter the checkpoint lacks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    state = _state(model, optimizer, trainable_only)
    keys = saved_keys(folder)
    missing = sorted(name for name in state["model"] if f"model.{name}" not in keys)
    if missing:
        raise MissingStateError(f"checkpoint lacks {len(missing)} parameter(s) of this model (first: {missing[0]})")
    with warnings.catch_warnings():
        # One process (export, a 1-worker run) is meant: torch warns it assumes so.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(Path(folder) / DCP_DIR), no_dist=not _distributed())
    # The frozen parameters are not in the state: every key that is was checked above.
    options = StateDictOptions(strict=not trainable_only)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=options)


def read_model_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every model tensor the sharded checkpoint ``folder`` holds, whole, by parameter name; one process, no model.

    For an adapter checkpoint (a LoRA run's): its tensors are the adapters, read as saved.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(Path(folder) / DCP_DIR))
    prefix = "model."
    state = {key[len(prefix):]: torch.empty(entry.size, dtype=entry.properties.dtype)
             for key, entry in reader.read_metadata().state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return state


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
