"""``serve.adapters``: LoRA adapters on a replica's base model, loaded on first use, least recently used unloaded.

Each adapter is a Ray Serve multiplexed model (``@serve.multiplexed``) whose id is
its name in ``serve.adapters``: a replica keeps up to
``serve.max_adapters_per_replica`` of them and Serve unloads the least recently
used beyond that. The adapter is named in the request body (the OpenAI ``model``
field), which Serve's router does not read: with several replicas, each loads the
adapters its own requests ask for. The base model is in memory once per replica (:class:`raylm.inference.adapters.SharedBase`);
each loaded adapter gets a :class:`~raylm.serving.batching.ModelWorker` of its
own, so batches hold one adapter's requests.

An adapter given as ``models:/name@alias`` is looked up in the registry again
once ``serve.adapter_alias_ttl_s`` has passed: when the alias has moved, the new
version is loaded beside the old one, new requests go to it, and the old one is
unloaded when its last request has finished. No restart.

A request holds a lease on the adapter it uses until its response has been sent
(streams included; :class:`AdapterLeases`), so unloading never pulls an adapter
from under a batch that is using it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

from ray import serve

from raylm.common.tracking import (ModelIntegrityError, RegistryError, get_model_version, parse_registry_uri,
                                  resolve_model_path)
from raylm.config import ServeConfig
from raylm.inference.adapters import AdapterError, SharedBase
from raylm.inference.engine import Engine
from raylm.serving.batching import ModelWorker
from raylm.serving.guard import APIError

logger = logging.getLogger(__name__)

_LEASES: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("raylm_adapter_leases", default=None)


class _Loaded:
    """One version of an adapter in the base model: its slot, its worker and the requests that use it."""

    def __init__(self, shared: SharedBase, name: str, reference: str, slot: str, worker: ModelWorker):
        self.shared, self.name, self.reference, self.slot, self.worker = shared, name, reference, slot, worker
        self.leases = 0
        self.retired = False

    def lease(self) -> None:
        self.leases += 1

    def release(self) -> None:
        self.leases -= 1
        self._unload_if_done()

    def retire(self) -> None:
        """No new requests: unload as soon as the running ones have finished."""
        self.retired = True
        self._unload_if_done()

    def _unload_if_done(self) -> None:
        if self.retired and self.leases == 0:
            self.leases = -1  # once
            # Off the event loop: the base's lock may be held by a forward pass on a model thread.
            asyncio.get_running_loop().run_in_executor(None, self.shared.unload, self.slot)
            logger.info("unloading adapter %s (%s)", self.name, _shown(self.reference))


class _Adapter:
    """What Serve's multiplexing caches per adapter name; Serve calls ``__del__`` when it unloads it."""

    def __init__(self, name: str, current: _Loaded, held: dict[str, "_Adapter"]):
        self.name, self.current, self.held = name, current, held
        self.swap_lock = asyncio.Lock()
        self.__del__ = self._evict  # Serve looks it up on the instance; the garbage collector never calls it

    async def _evict(self) -> None:
        if self.held.get(self.name) is self:
            del self.held[self.name]
        self.current.retire()


class AdapterLeases:
    """ASGI middleware: the adapter leases a request takes are released once its response has been sent."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        leases: list[_Loaded] = []
        token = _LEASES.set(leases)
        try:
            await self.app(scope, receive, send)
        finally:
            _LEASES.reset(token)
            for loaded in leases:
                loaded.release()


class AdapterPool:
    """The adapters of ``serve.adapters`` on one replica's base model."""

    def __init__(self, shared: SharedBase, base_name: str, config: ServeConfig, tracking_uri: Optional[str],
                 make_worker: Callable[[Engine], ModelWorker]):
        self.shared, self.base_name, self.tracking_uri = shared, base_name, tracking_uri
        self.references = dict(config.adapters)
        self.alias_ttl_s = config.adapter_alias_ttl_s
        self.make_worker = make_worker
        self._aliases: dict[str, tuple[float, str]] = {}
        self._adapters: dict[str, _Adapter] = {}

        async def load(name: str) -> _Adapter:
            adapter = _Adapter(name, await self._load(name, await self._resolve(name)), self._adapters)
            self._adapters[name] = adapter
            return adapter

        # A function, not a method: its LRU cache is per replica, its size from this replica's config.
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=config.max_adapters_per_replica)(load)

    @property
    def names(self) -> list[str]:
        return list(self.references)

    async def worker(self, name: str) -> ModelWorker:
        """The worker of adapter ``name`` (loaded now if it is not), leased until the response has been sent."""
        leases = _LEASES.get()
        if leases is None:
            raise RuntimeError("AdapterPool.worker outside a request (AdapterLeases middleware missing)")
        adapter: _Adapter = await self._multiplexed(name)
        # Leased before the next await: an eviction meanwhile retires it, but unloads it only after this request.
        loaded = adapter.current
        loaded.lease()
        leases.append(loaded)
        reference = await self._resolve(name)
        if loaded.reference != reference:
            async with adapter.swap_lock:
                if adapter.current.reference != reference:  # the alias moved: new version beside the old one
                    old, adapter.current = adapter.current, await self._load(name, reference)
                    old.retire()
            loaded = adapter.current
            loaded.lease()
            leases.append(loaded)
        return loaded.worker

    def loaded(self) -> list[dict[str, Any]]:
        """The adapters this replica holds now (for ``/healthz``): name and registry version, no file paths."""
        out = []
        for name, adapter in self._adapters.items():
            _, version, _ = (parse_registry_uri(adapter.current.reference)
                             if adapter.current.reference.startswith("models:/") else (None, None, None))
            out.append({"id": name, **({"version": version} if version else {})})
        return out

    async def _resolve(self, name: str) -> str:
        """The adapter's reference now: a folder, ``models:/name/version``, or an alias's current version."""
        reference = self.references[name]
        if not reference.startswith("models:/") or parse_registry_uri(reference)[2] is None:
            return reference
        cached = self._aliases.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.alias_ttl_s:
            return cached[1]
        try:
            version = await asyncio.to_thread(get_model_version, self.tracking_uri or _default_tracking_uri(),
                                              reference)
        except RegistryError as err:
            raise APIError(404, f"adapter {name!r}: {err}", "model", "model_not_found") from None
        resolved = f"models:/{version.name}/{version.version}"
        self._aliases[name] = (time.monotonic(), resolved)
        return resolved

    async def _load(self, name: str, reference: str) -> _Loaded:
        scratch = tempfile.mkdtemp(prefix="raylm-adapter-") if reference.startswith("models:/") else None
        try:
            folder = await asyncio.to_thread(resolve_model_path, reference, self.tracking_uri, scratch)
            slot = await asyncio.to_thread(self.shared.load, folder, repr(name))
        except (AdapterError, FileNotFoundError, ModelIntegrityError) as err:
            raise APIError(400, f"adapter {name!r} cannot be served: {err}", "model", "adapter_unavailable") \
                from None
        except RegistryError as err:
            raise APIError(404, f"adapter {name!r}: {err}", "model", "model_not_found") from None
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)  # the weights are in memory now
        view = self.shared.view(slot, name)
        view.parent = self.base_name
        logger.info("loaded adapter %s (%s)", name, _shown(reference))
        return _Loaded(self.shared, name, reference, slot, self.make_worker(view))


def _shown(reference: str) -> str:
    """A reference as logs show it: a registry URI, never a local path."""
    return reference if reference.startswith("models:/") else "a folder"


def _default_tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
