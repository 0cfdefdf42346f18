"""Model names → what serves them: the base model or a LoRA adapter (through the cluster-wide
adapter registry), the model deployment's handles for each (adapter calls carry their Serve
multiplexed id), and the /v1/models cards."""

from __future__ import annotations

from typing import Any

from deployments.adapters import AdapterRegistry
from deployments.api import errors
from deployments.api.responses import model_card


class ModelDirectory:
    def __init__(
        self,
        model_id: str,
        owned_by: str,
        created: int,
        model_handle,
        adapters: AdapterRegistry,
        default_model: str | None = None,
        aliases: dict[str, str] | None = None,
    ):
        self.model_id, self.owned_by, self.created = model_id, owned_by, created
        self.default_model = default_model
        self.aliases = dict(aliases or {})
        self.adapters = adapters
        self.model = model_handle
        self._handles: dict[str | None, tuple[Any, Any]] = {None: (model_handle, model_handle.options(stream=True))}

    async def resolve(self, name: str | None) -> tuple[str, str | None]:
        """(served name, multiplexed adapter id or None for the base model); 404 if unknown.
        No name: the configured default model; an alias: the model it names (and the response
        names the model that served it)."""
        if name in (None, ""):
            name = self.default_model
        if name is not None:
            name = self.aliases.get(name, name)
        if name in (None, "", self.model_id):
            return self.model_id, None
        ref = await self.adapters.lookup(name)  # this replica's copy of the registry: no actor call
        if ref is None:
            raise errors.model_not_found(name)
        return ref.name, ref.multiplexed_id

    def handles(self, mux: str | None):
        """(unary, streaming) model handles; adapter requests carry their multiplexed id so
        Serve routes them to replicas that already hold the adapter."""
        if mux not in self._handles:
            h = self.model.options(multiplexed_model_id=mux)
            self._handles[mux] = (h, h.options(stream=True))
        return self._handles[mux]

    def forget(self, adapter_name: str) -> None:
        """Drop the handles of an unloaded adapter (every version)."""
        self._handles = {k: v for k, v in self._handles.items() if k is None or not k.startswith(adapter_name + "@")}

    def card(self, name: str, root: str | None = None) -> dict[str, Any]:
        if name == self.model_id:
            return model_card(self.model_id, self.owned_by, created=self.created)
        return model_card(name, self.owned_by, root=root, parent=self.model_id, created=self.created)

    async def cards(self) -> list[dict[str, Any]]:
        """The base model and every registered adapter."""
        refs = await self.adapters.list()
        cards = [self.card(self.model_id)] + [self.card(ref.name, ref.path) for ref in refs]
        paths = {ref.name: ref.path for ref in refs}
        return cards + [self.card(alias, paths.get(target, target)) for alias, target in self.aliases.items()]
