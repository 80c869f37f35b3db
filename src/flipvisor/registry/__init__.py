"""Where promotions are recorded: the seed's keys, in a local file or in etcd."""

from __future__ import annotations

from .base import (
    KEY_SUFFIXES,
    KeyRange,
    Registry,
    Snapshot,
    WatchableRegistry,
    WatchEvent,
    WatchLost,
    key_matches,
    program_key,
    withdrawn,
)

__all__ = [
    "KEY_SUFFIXES",
    "KeyRange",
    "Registry",
    "Snapshot",
    "WatchEvent",
    "WatchLost",
    "WatchableRegistry",
    "key_matches",
    "open_registry",
    "program_key",
    "withdrawn",
]


def open_registry(config: object) -> WatchableRegistry:
    """The backend that ``config`` (a ``flipvisor.config.Config``) names; not yet connected."""
    from flipvisor.config import Config

    assert isinstance(config, Config)
    if config.registry.backend == "etcd":
        from .etcd import EtcdRegistry

        return EtcdRegistry(config.registry)
    from .local import LocalRegistry
    from .local_file import registry_file

    return LocalRegistry(registry_file(config.state_dir), config.registry)
