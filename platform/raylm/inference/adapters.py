"""LoRA adapters served side by side on one base model (``serve.adapters``).

:class:`SharedBase` holds a causal-LM :class:`~raylm.inference.engine.Engine`
once and loads adapter folders into it (:class:`raylm.models.lora.AdapterSlots`).
:meth:`SharedBase.view` gives an Engine per adapter (and one for the base alone)
that shares the base's weights, tokenizer and conventions; each forward pass of a
view runs under the base's lock with that view's adapter active. Batches are
formed per view, so a batch holds one adapter's rows only and every answer is the
one that adapter gives alone (unmerged: equal to the merged model's up to float
rounding). Two views' batches may interleave step by step: each forward pass
carries its own key/value cache, so switching adapters between passes is exact.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any, Optional

from raylm.inference.engine import Engine
from raylm.models.lora import AdapterError, AdapterSlots, base_identities, check_adapter_base

__all__ = ["AdapterError", "SharedBase"]


class _AdaptedModule:
    """The base model as one adapter sees it: calls run under the lock with that adapter active; everything else
    (config, generation_config, parameters, ...) is the base model's."""

    def __init__(self, shared: "SharedBase", slot: Optional[str]):
        self._shared, self._slot = shared, slot

    def __call__(self, *args, **kwargs):
        with self._shared.lock:
            self._shared.slots.activate(self._slot)
            return self._shared.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared.model, name)


class SharedBase:
    """One base model in memory and the adapters loaded into it; thread-safe."""

    def __init__(self, engine: Engine, base_folder: str | Path):
        if not isinstance(engine, Engine):
            raise AdapterError(f"adapters need a causal language model as the base, not a {engine.kind} model")
        self.engine = engine
        self.model = engine.model
        self.lock = threading.Lock()
        self.slots = AdapterSlots(self.model)
        self.identities = base_identities(base_folder)
        self._count = 0

    def view(self, slot: Optional[str], name: str) -> Engine:
        """An Engine named ``name`` that answers with the adapter in ``slot`` (None: the base alone)."""
        adapted = copy.copy(self.engine)
        adapted.model = _AdaptedModule(self, slot)
        adapted.name = name
        return adapted

    def load(self, folder: str | Path, label: str) -> str:
        """Load the adapter folder (``label`` names it in errors); returns its slot. :class:`AdapterError` when it
        was trained on another base or its matrices do not fit."""
        check_adapter_base(folder, self.identities, label)
        with self.lock:
            self._count += 1
            slot = f"adapter{self._count}"  # module names: no dots, unique for each load
            self.slots.load(slot, folder)
        return slot

    def unload(self, slot: str) -> None:
        with self.lock:
            self.slots.unload(slot)

    def loaded(self) -> list[str]:
        with self.lock:
            return self.slots.loaded
