"""LoRA adapters (peft) on a built transformers model: targets, injection, adapter folders.

:func:`apply_lora` injects peft's LoRA layers into the model in place
(``peft.inject_adapter_in_model``): the model stays the transformers model it
was, so parallelism (:mod:`raylm.train.parallel`), state-dict names and the
training loop treat it like any other, and only the adapter matrices require
gradients. Training checkpoints hold those matrices under the model's own
parameter names; :func:`write_adapter_folder` turns them into a PEFT adapter
folder (``adapter_config.json`` + ``adapter_model.safetensors``, what
``PeftModel.from_pretrained`` reads) and optionally a merged plain model folder.
:func:`load_adapted_model` reads an adapter folder back, merged into its base,
for inference. The embeddings stay as the checkpoint has them: raylm adds no
tokens to a pretrained causal LM's tokenizer (``data.tokenizer.extends_tokenizer``),
and a tokenizer with ids beyond its rows is refused before training.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from raylm.common.fingerprints import fingerprint
from raylm.common.pretrained import checkpoint_fingerprint, embedding_rows, locate_checkpoint, tokenizer_vocabulary
from raylm.models.errors import AdapterError
from raylm.models.pretrained import load_pretrained

_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The attention and MLP projections, by config.json's model_type.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_PROJECTIONS, "qwen2": _LLAMA_PROJECTIONS, "qwen3": _LLAMA_PROJECTIONS,
    "mistral": _LLAMA_PROJECTIONS, "gpt2": ("c_attn", "c_proj", "c_fc"),
}
ADAPTER_CONFIG = "adapter_config.json"
# The parameters peft's LoRA adds: the two matrices of each adapted module.
ADAPTER_MARKERS = re.compile(r"\.lora_[AB]\.")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _adaptable_modules(model: torch.nn.Module) -> list[str]:
    """Full names of the modules peft's LoRA can wrap here: Linear layers and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]


def resolve_targets(model: torch.nn.Module, target_modules: Optional[list[str]]) -> list[str]:
    """``target_modules``, or the architecture's defaults; :class:`AdapterError` naming any that the model lacks."""
    model_type = getattr(model.config, "model_type", "")
    if target_modules is None:
        if model_type not in DEFAULT_TARGETS:
            raise AdapterError(f"train.lora.target_modules: no default for model_type {model_type!r} "
                               f"(defaults exist for {', '.join(DEFAULT_TARGETS)}): name the modules")
        target_modules = list(DEFAULT_TARGETS[model_type])
    names = _adaptable_modules(model)
    unknown = [target for target in target_modules
               if not any(name == target or name.endswith("." + target) for name in names)]
    if unknown:
        known = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise AdapterError(f"train.lora.target_modules: {', '.join(unknown)} not in {type(model).__name__} "
                           f"(its linear modules: {', '.join(known)})")
    return list(target_modules)


def check_targets(init_from: str | Path, lora) -> list[str]:
    """The target modules ``lora`` resolves to on the checkpoint ``init_from``; :class:`AdapterError` when any is
    missing. Builds the architecture on the meta device: no weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = locate_checkpoint(init_from)
    config = AutoConfig.from_pretrained(checkpoint.folder, **checkpoint.tokenizer_kwargs())
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return resolve_targets(skeleton, lora.target_modules)


def check_embedding_rows(init_from: str | Path, tokenizer_path: str | Path | None = None) -> None:
    """:class:`AdapterError` when the tokenizer that trains (``tokenizer_path``, else the checkpoint's own) has
    ids beyond the checkpoint's embedding rows. Full fine-tuning grows the embeddings for them; LoRA keeps the
    embeddings frozen, so the new rows would stay random, and an adapter-only checkpoint could not carry them."""
    checkpoint = locate_checkpoint(init_from)
    source = tokenizer_path or (checkpoint.folder / checkpoint.gguf_file if checkpoint.gguf_file
                                else checkpoint.folder)
    vocabulary, rows = tokenizer_vocabulary(source), embedding_rows(checkpoint)
    if not vocabulary or rows is None:
        return
    needed = max(vocabulary.values()) + 1
    if needed > rows:
        raise AdapterError(f"train.lora: the tokenizer's ids reach {needed - 1}, beyond the {rows} embedding rows "
                           "of model.init_from, and LoRA keeps the embeddings frozen (the added rows would never "
                           "train): fine-tune without train.lora, or use a tokenizer within the embedding rows")


def peft_config(lora, model: torch.nn.Module):
    """peft's LoraConfig for raylm's ``train.lora`` section on ``model``."""
    from peft import LoraConfig as PeftLoraConfig  # peft imports in seconds: only where adapters are used

    fan_in_fan_out = getattr(model.config, "model_type", "") == "gpt2"  # Conv1D stores weights transposed
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                          target_modules=resolve_targets(model, lora.target_modules), fan_in_fan_out=fan_in_fan_out,
                          task_type="CAUSAL_LM")


def apply_lora(model: torch.nn.Module, lora) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns ``model``."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(peft_config(lora, model), model)
    for name, param in model.named_parameters():
        param.requires_grad_(ADAPTER_MARKERS.search(name) is not None)
    return model


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether :func:`apply_lora` injected adapters into ``model``."""
    return bool(getattr(model, "peft_config", None))


def trainable_names(model: torch.nn.Module) -> list[str]:
    """The names of the parameters that train (the adapters under LoRA)."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


@contextlib.contextmanager
def _without_peft_deprecation() -> Iterator[None]:
    """peft 0.21 asks transformers 5 for ``is_gradient_checkpointing``, which warns that it is deprecated: a warning
    about peft's internals that a user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _load_base(base: str | Path, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        checkpoint = locate_checkpoint(base)
    except (FileNotFoundError, ValueError) as err:
        raise AdapterError(f"the adapter's base model: {err}") from None
    return load_pretrained(AutoModelForCausalLM, checkpoint, dtype=dtype)


def write_adapter_folder(base: str | Path, lora, weights: dict[str, torch.Tensor], out: Path,
                         merged_out: Optional[Path] = None) -> dict[str, Any]:
    """Write the adapter trained on ``base`` as a PEFT adapter folder ``out`` (and a merged model at ``merged_out``).

    ``weights`` are the adapter matrices under the adapted model's parameter names (a
    training checkpoint's). The folder is written by peft itself (``save_pretrained``),
    so ``PeftModel.from_pretrained(base, out)`` loads it; ``adapter_config.json``
    names ``base``. Returns a description for the model card.
    """
    from peft import get_peft_model

    model = _load_base(base)
    with _without_peft_deprecation():
        wrapped = get_peft_model(model, peft_config(lora, model))
    inner = wrapped.base_model.model
    expected = set(trainable_names(inner))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise AdapterError(f"the checkpoint's adapter does not fit train.lora on {base}: "
                           + (f"missing {missing[0]}" if missing else f"unknown {extra[0]}"))
    inner.load_state_dict(weights, strict=False)
    wrapped.peft_config["default"].base_model_name_or_path = str(base)
    # The adapters only: the embeddings are the base's, never a copy in the adapter folder.
    wrapped.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    if merged_out is not None:
        merged = wrapped.merge_and_unload()
        merged.save_pretrained(merged_out, safe_serialization=True)
    return {"base": str(base), "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_modules": sorted(wrapped.peft_config["default"].target_modules),
            "adapter_parameters": sum(tensor.numel() for tensor in weights.values())}


def is_adapter_folder(folder: str | Path) -> bool:
    """A PEFT adapter folder (``adapter_config.json``) rather than a full model folder."""
    return (Path(folder) / ADAPTER_CONFIG).is_file() and not (Path(folder) / "config.json").is_file()


def load_adapted_model(folder: str | Path, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """The base model an adapter folder names with the adapter merged in (inference: no extra matmuls).

    Safetensors only: a folder whose adapter weights come in another format is refused.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(f"{folder}: unreadable {ADAPTER_CONFIG} ({err})") from None
    if config.get("peft_type") != "LORA" or not config.get("base_model_name_or_path"):
        raise AdapterError(f"{folder}: not a LoRA adapter with a local base model")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} (adapters are read from safetensors only)")
    from peft import PeftModel

    base = _load_base(config["base_model_name_or_path"], dtype)
    with _without_peft_deprecation():
        return PeftModel.from_pretrained(base, folder, is_trainable=False).merge_and_unload()


# --------------------------------------------------------------------------- several adapters on one base


def read_adapter_folder(folder: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """peft's LoraConfig and the adapter matrices (names as the folder stores them) of a LoRA adapter folder.
    Safetensors only; :class:`AdapterError` with one line for anything else."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(f"{folder.name}: unreadable {ADAPTER_CONFIG} ({err})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{folder.name}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{folder.name}: no {ADAPTER_WEIGHTS} (adapters are read from safetensors only)")
    return PeftLoraConfig.from_pretrained(str(folder)), load_file(str(folder / ADAPTER_WEIGHTS))


def base_identities(folder: str | Path) -> set[str]:
    """The fingerprints an adapter trained on the model in ``folder`` may record as its base: the folder's own
    (:func:`checkpoint_fingerprint`) and, for a folder ``raylm convert`` wrote from a GGUF file, that file's."""
    folder = Path(folder)
    identities = {checkpoint_fingerprint(locate_checkpoint(folder))}
    try:
        card = json.loads((folder / "raylm.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        card = {}
    source, digest = card.get("converted_from"), card.get("source_sha256")
    if isinstance(source, str) and source.lower().endswith(".gguf") and digest:
        identities.add(fingerprint({source: digest}))
    return identities


def check_adapter_base(adapter: str | Path, served_base: set[str], label: str) -> None:
    """:class:`AdapterError` unless the adapter folder ``adapter`` was trained on the served base, whose
    :func:`base_identities` are ``served_base``. An adapter without raylm's card (one peft wrote elsewhere) is
    held to peft's own check when it loads: its matrices must fit the base's modules."""
    try:
        card = json.loads((Path(adapter) / "raylm.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    recorded = (card.get("adapter") or {}).get("base_fingerprint")
    if recorded and recorded not in served_base:
        raise AdapterError(f"adapter {label} was trained on another base model (base fingerprint "
                           f"{recorded[:12]}..., the served base is {sorted(served_base)[0][:12]}...)")


_UNSET = object()


class AdapterSlots:
    """LoRA adapters side by side on one model: each loaded under its own name into the same peft LoRA layers,
    one of them (or none: the base alone) active at a time.

    Not thread-safe: the caller serialises :meth:`activate` + forward, :meth:`load` and :meth:`unload` (the
    serving engine holds one lock around each; :class:`raylm.inference.adapters.SharedBase`).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.active: object = _UNSET  # the slot every LoRA layer has active: None for the base alone
        self._layers: list = []

    @property
    def loaded(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}) or {})

    def load(self, slot: str, folder: str | Path) -> int:
        """Load the adapter folder into slot ``slot`` (a new name); returns its parameter count."""
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        config, weights = read_adapter_folder(folder)
        config.inference_mode = True
        with _without_peft_deprecation(), warnings.catch_warnings():
            # "Already found a peft_config attribute in the model": several adapters are the point here.
            warnings.filterwarnings("ignore", message=".*multiple adapters.*", category=UserWarning)
            inject_adapter_in_model(config, self.model, adapter_name=slot)
        named = {name.removeprefix("base_model.model.").replace(".lora_A.weight", f".lora_A.{slot}.weight")
                 .replace(".lora_B.weight", f".lora_B.{slot}.weight"): tensor for name, tensor in weights.items()}
        expected = {name for name, _ in self.model.named_parameters() if f".{slot}." in name}
        if set(named) != expected:
            self._drop(slot)
            missing, extra = sorted(expected - set(named)), sorted(set(named) - expected)
            raise AdapterError(f"{Path(folder).name}: its matrices do not fit the base model "
                               + (f"(missing {missing[0]})" if missing else f"(unknown {extra[0]})"))
        try:
            self.model.load_state_dict(named, strict=False)
        except RuntimeError as err:  # shapes that do not fit this base
            self._drop(slot)
            raise AdapterError(f"{Path(folder).name}: its matrices do not fit the base model "
                               f"({str(err).splitlines()[-1].strip()})") from None
        self.model.eval()  # new LoRA layers start in training mode (dropout on)
        self._layers = [module for module in self.model.modules() if isinstance(module, BaseTunerLayer)]
        self.active = _UNSET  # peft made the new adapter active in the layers it wraps
        return sum(tensor.numel() for tensor in named.values())

    def activate(self, slot: Optional[str]) -> None:
        """Make ``slot`` the adapter every forward uses; None: the base model alone."""
        if slot == self.active:
            return
        for layer in self._layers:
            if slot is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(slot)
        self.active = slot

    def unload(self, slot: str) -> None:
        """Remove the adapter in ``slot`` and free its matrices."""
        self._drop(slot)

    def _drop(self, slot: str) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        others = [name for name in self.loaded if name != slot]
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer) and slot in getattr(module, "lora_A", {}):
                # peft picks another adapter to stay active when the active one goes; with none left the layer
                # keeps only its base weights.
                module.delete_adapter(slot)
        (getattr(self.model, "peft_config", None) or {}).pop(slot, None)
        self.active = _UNSET  # peft may have made another adapter active
        if not others:
            self._layers = []
