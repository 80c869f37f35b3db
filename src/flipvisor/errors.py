"""The exception hierarchy: every error carries a message for the user and the exit code it maps to
(and ``is_own`` tells those from the rest: bugs, to log with their traceback).

Only ``cli.py`` turns these into exit codes; everything else raises them with context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .starttime import Recorded

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class FlipvisorError(Exception):
    """Base class: ``str(error)`` is a complete sentence for the operator."""

    exit_code = EXIT_FAILED


def is_own(exc: BaseException) -> bool:
    """Whether ``exc`` is one of flipvisor's own expected errors (or a group of those): said in
    a sentence, where anything else is a bug to log with its traceback."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_own(each) for each in exc.exceptions)
    return isinstance(exc, FlipvisorError)


class ConfigError(FlipvisorError):
    """The config file is missing, unreadable or invalid; ``problems`` lists every one found."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        detail = "".join(f"\n  {problem}" for problem in self.problems)
        super().__init__(message + detail)


class UsageError(FlipvisorError):
    """The command line asks for something that does not exist (an unknown program, say)."""

    exit_code = EXIT_USAGE


class ControlUnreachable(FlipvisorError):
    """No supervisor answers on the control socket."""

    exit_code = EXIT_USAGE


class SpawnError(FlipvisorError):
    """A process could not be started (missing executable, bad cwd, exhausted resources)."""


class BindError(SpawnError):
    """A generation's listening socket could not be bound (in use, not a local address);
    ``in_use``: whether something holds the address (freeing it is then a way out)."""

    def __init__(self, message: str, *, in_use: bool = False) -> None:
        super().__init__(message)
        self.in_use = in_use


class ProbeFailed(FlipvisorError):
    """A new generation did not become ready: timeout, failed checks, or a worker exited."""


class ProxyError(FlipvisorError):
    """Rendering, checking or reloading the proxy configuration failed."""


class ProxyFileError(ProxyError):
    """The proxy file cannot be written where ``proxy.dest`` says (a folder there, a file on
    its way, a read-only folder): the template and commands are not to blame."""


class ProxyReloadFailed(ProxyError):
    """The reload command ran and did not succeed: the proxy may have loaded the new
    configuration all the same (``nginx -s reload`` in a wrapper that then fails a later step),
    so whoever undoes the change must reload the proxy again."""


class ProxyReloadTimedOut(ProxyReloadFailed):
    """The reload command outlived its timeout: the proxy may or may not have reloaded.
    ``before``: the proxy's workers read before the command (empty without a pidfile, or with
    no worker), by which ``proxy_reload.applied`` tells whether the proxy applied it anyway."""

    def __init__(self, message: str, before: frozenset[Recorded] = frozenset()) -> None:
        super().__init__(message)
        self.before = before


class ProxyReloadNotTaken(ProxyReloadFailed):
    """The reload command succeeded, but the proxy's master (its ``pidfile``) started no new
    worker: nginx rejected the new configuration at the reload (a ``listen`` it could not bind,
    which ``nginx -t`` does not try) and serves on with its old workers and old configuration,
    or it has not applied it yet. Undone like a failed reload (reloaded back): a slow proxy may
    still apply it later."""


class RegistryError(FlipvisorError):
    """The registry could not be read or written (etcd unreachable, a lost compare, I/O error).

    ``next_step``: what the operator can do about it, where the backend knows (the local one's
    file is corrupt: which file, and how to fix it); else a failed flip says to make etcd
    reachable."""

    def __init__(self, message: str, next_step: str | None = None) -> None:
        super().__init__(message)
        self.next_step = next_step


class RegistryUnanswered(RegistryError):
    """The registry gave no answer: no reply within the request timeout, or it could not be
    reached at all (gRPC's UNAVAILABLE or DEADLINE_EXCEEDED, a failed connection). Unlike a
    refusal or a lost compare, asking again may cost another whole timeout."""


class RegistryConflict(RegistryError):
    """A promotion lost its compare: somebody else changed the keys it expected to replace.
    Reaching the registry is no help then: who else writes the keys is."""

    def __init__(self, message: str, next_step: str | None = None) -> None:
        super().__init__(
            message,
            next_step
            or "find what else writes these keys (another supervisor or a service registering "
            "itself under the same registry.prefix; `flipvisor status` shows what this one "
            "serves)",
        )


class FlipFailed(FlipvisorError):
    """A flip was rolled back; the old generation is still serving.

    ``output`` holds the new generation's last output lines, to show why.
    """

    def __init__(self, message: str, output: list[str] | None = None) -> None:
        self.output = output or []
        super().__init__(message)


class Busy(FlipvisorError):
    """Another operation on the same program is in progress."""


def flip_next_step(exc: BaseException, program: str, *, retry: str = "flip") -> str:
    """What the operator can do about a failed flip of ``program``, by what failed; ``retry``
    is the command that tries again once it is fixed: ``start`` when nothing serves (the
    program is ``fatal``, and ``start`` is what clears it)."""
    again = f"then `flipvisor {retry} {program}`"
    if isinstance(exc, ProxyFileError):
        return f"fix programs.{program}.proxy.dest (or the folders on its way), {again}"
    if isinstance(exc, ProxyError):
        return f"fix the proxy template or its check/reload command, {again}"
    if isinstance(exc, RegistryError):
        return f"{exc.next_step or 'make the registry reachable (registry.endpoints)'}, {again}"
    if isinstance(exc, BindError) and exc.in_use:
        return f"free the address or change programs.{program}.socket, {again}"
    if isinstance(exc, BindError):
        return f"change programs.{program}.socket, {again}"
    if isinstance(exc, SpawnError):
        return f"fix programs.{program}.command or cwd in the config, {again}"
    return f"`flipvisor logs {program}` shows its output"
