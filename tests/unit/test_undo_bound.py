"""How long a failed promotion's undo may take (``promotion_undo.undo_bound``): long enough for
its reload back, confirmed within the proxy's timeout like any reload."""

from __future__ import annotations

from pathlib import Path

from flipvisor.config import ProxyConfig
from flipvisor.promotion_undo import UNDO_TIMEOUT, undo_bound


def _proxy(timeout: float) -> ProxyConfig:
    return ProxyConfig(template=Path("t.j2"), dest=Path("site.conf"), timeout=timeout)


def test_the_undo_has_time_for_the_keys_and_a_check_reload_and_confirmation_back() -> None:
    """A proxy timeout raised for an nginx slow to load its config (60 s) gives the undo time
    for the keys put back (a swap and a publish, within the registry's timeout each) and for the
    reload back's check, command and confirmation (within the proxy's timeout each): a fixed 30 s
    cut that reload back short, so the reload's confirmation had a cap of its own instead."""
    assert undo_bound(_proxy(60), registry_timeout=5) == 2 * 5 + 3 * 60


def test_the_undo_is_given_at_least_its_floor() -> None:
    """Short timeouts do not make the undo's bound shorter than it was (``UNDO_TIMEOUT``)."""
    assert undo_bound(_proxy(1), registry_timeout=1) == UNDO_TIMEOUT == 30
    assert undo_bound(None, registry_timeout=5) == UNDO_TIMEOUT


def test_with_the_default_timeouts_the_undo_outlasts_a_reload_back_confirmed_in_full() -> None:
    """The defaults (proxy 30 s, registry 5 s): the reload back's confirmation (up to 30 s) no
    longer runs the undo out, which then said "reloading it back did not finish"."""
    default = ProxyConfig(template=Path("t.j2"), dest=Path("site.conf"))
    assert undo_bound(default, registry_timeout=5) == 100
