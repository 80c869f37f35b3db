"""A program's crash policy: what it does when one of its workers exits. The restart decision
(``restarts.judge_exit``) carried out: a restart after a backoff, a slot left stopped, a
generation failed before it served, ``fatal`` past the restart budget; and the program stopped
once nothing of its serving generation runs or will run again (``given-up``), the generation kept
warm for a rollback left warm: the way back from a release that failed after its flip.

``CrashPolicy`` is a part of its ``Program`` (``program.crashes``): the state it acts on (the
serving and warm generations, ``fatal_reason``) is the program's. The restart budgets are its own:
one per generation (``budget_of``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ProgramConfig, same_deploy
from .fatal_advice import RollbackWay, fatal_advice, next_steps, shown_command
from .generation import Generation
from .restarts import RestartBudget, Verdict, judge_exit
from .socket_holders import SocketHolders, socket_inode
from .worker import Worker

if TYPE_CHECKING:
    from .program import Program


class CrashPolicy:
    """One program's answer to its workers' exits."""

    def __init__(self, program: Program) -> None:
        self.program = program
        # What failed into ``fatal`` (None: unknown): a rollback to it is no way out of it.
        self._failing: ProgramConfig | None = None
        # Each generation's restart budget by its number, made at its first exit: a handful at
        # most (those in ``program.generations``; the others are dropped as budgets are made).
        self._budgets: dict[int, RestartBudget] = {}

    def budget_of(self, gen: Generation) -> RestartBudget:
        """``gen``'s restart budget, of its own config's ``restart``. Not the program's: the
        restarts of a release that crash-looped are no reason to make the release flipped in
        after it ``fatal`` at its first crash. A warm generation that a rollback routes back to
        finds what it spent while it served (its exits while warm spend nothing)."""
        budget = self._budgets.get(gen.number)
        if budget is None:
            live = {each.number for each in self.program.generations}
            for number in [number for number in self._budgets if number not in live]:
                del self._budgets[number]
            limits = gen.config.restart
            budget = self._budgets[gen.number] = RestartBudget(limits.max_restarts, limits.window)
        return budget

    def forgive(self, gen: Generation) -> None:
        """``start`` cleared ``fatal``: ``gen`` has its whole restart budget again."""
        self.budget_of(gen).reset()

    def worker_exited(
        self, gen: Generation, worker: Worker, returncode: int | None, reason: str
    ) -> float | None:
        """The delay before ``worker`` of ``gen`` is restarted, or None to leave it stopped."""
        program = self.program
        stopping = program.stops_under_way and program.serving is None and gen.was_serving
        if stopping and gen is not program.warm:
            # Its keys are being withdrawn, its drain begins next: a `drain_pid` watcher that saw
            # `pid/previous` change may signal it before our drain does. Not restarted. (A warm
            # generation that a `given-up` stop keeps is judged as ever: drained, as it left.)
            program.log.note(f"[flipvisor] g{gen.number} w{worker.index} {reason}; stopping")
            return None
        if gen is program.retirement.reviving:
            # A rollback probes or routes back to this warm generation: like a new generation's,
            # a worker lost now fails the rollback (at once), and is not restarted.
            program.log.note(f"[flipvisor] g{gen.number} w{worker.index} {reason}; rollback fails")
            gen.fail(f"worker {worker.index} of generation {gen.number} {reason}")
            return None
        held = program.retirement.held
        if held is not None and gen is held.old:
            # Replaced, in its drain delay: not restarted, as once signalled; a flip that routes
            # back to it finds it short of a worker (``route_back.py``) and drains it instead.
            program.log.note(f"[flipvisor] g{gen.number} w{worker.index} {reason}; draining")
            return None
        verdict = judge_exit(
            policy=gen.config.restart,
            budget=self.budget_of(gen),
            returncode=returncode,
            reason=reason,
            consecutive_failures=worker.consecutive_failures,
            starting=not gen.was_serving,
            replacing=not gen.first,
            where=f"worker {worker.index} of generation {gen.number}",
            warm=gen is program.warm,
            fatal=program.fatal_reason is not None,
        )
        return self._carry_out(verdict, gen, worker, reason)

    def _carry_out(
        self, verdict: Verdict, gen: Generation, worker: Worker, reason: str
    ) -> float | None:
        program = self.program
        if verdict.retire:
            program.log.note(f"[flipvisor] g{gen.number} w{worker.index} {reason}; warm: drained")
            program.retirement.drop_warm(gen)
            return None
        if verdict.not_restarted:
            program.log.note(f"[flipvisor] g{gen.number} w{worker.index} {reason}; not restarted")
        if verdict.fail is not None:
            gen.fail(verdict.fail)
        if verdict.fatal is not None:
            self.become_fatal(verdict.fatal, gen.number, failing=gen.config)
        if verdict.delay is None and verdict.fail is None and gen is program.serving:
            self.stop_if_given_up(worker)  # its PID left pid/current already (``Generation``)
        if verdict.delay is not None:
            worker.consecutive_failures += 1
            program.runtime.events.emit(
                "restarting",
                program.name,
                gen.number,
                reason,
                worker=worker.index,
                delay=round(verdict.delay, 3),
            )
        return verdict.delay

    def worker_restarted(self, gen: Generation) -> None:
        """A worker of ``gen`` runs again after its backoff: the program's ``restarts``. Counted
        here, not when the restart is scheduled (``_carry_out``, which spends the budget and
        grows the backoff): a stop, a removal or ``fatal`` may call it off before it happens."""
        self.program.restarts_total += 1

    def become_fatal(
        self,
        reason: str,
        generation: int | None,
        *,
        replace_reason: bool = False,
        failing: ProgramConfig | None = None,
    ) -> None:
        """Enter ``fatal`` (once: one `fatal` event, the first reason kept, as later workers of
        the generation exit because of it), until `start` or a promotion clears it.
        ``replace_reason``: a failed flip's report says more than the exit that failed it.
        ``failing``: the deploy that failed, which the advice does not offer as the way back."""
        program = self.program
        if program.fatal_reason is None:
            program.fatal_reason = reason
            self._failing = failing
            program.runtime.events.emit("fatal", program.name, generation, self.advice(reason))
            # Nothing is started once fatal: not even a restart already waiting out its backoff
            # (the budget that ran out since was spent on it). `start` revives those slots.
            for gen in program.generations:
                gen.give_up_restarts()
        elif replace_reason:
            program.fatal_reason = reason
            self._failing = failing

    def describe_fatal(self) -> str | None:
        """Why the program is ``fatal`` (None: it is not) and what to do (``fatal_advice``):
        ``status``'s ``fatal_reason`` and the ``fatal`` event. While a generation of the deploy a
        rollback goes back to is kept warm, ``rollback`` routes back to it at once; else, with a
        previous deploy recorded, ``rollback`` starts it afresh. Read when
        asked: the warm generation goes at the end of its window (or when a worker of it
        exits), and the reason then stops naming it."""
        reason = self.program.fatal_reason
        return None if reason is None else self.advice(reason)

    def advice(self, reason: str) -> str:
        """``reason`` and what to do about it (``fatal_advice``), as ``fatal_reason`` says it."""
        return fatal_advice(self.program.name, reason, self._rollback_way())

    def _rollback_way(self) -> RollbackWay:
        """What ``rollback`` would deploy: the generation kept warm for it or, without one, the
        previous deploy in the history, started afresh (the way back from a release that
        crash-loops), named by its command: after a rollback, it is the deploy rolled back from.
        Not offered if it is what failed (a `start` of a section edited back to it)."""
        program = self.program
        warm = self.rollback_target()
        previous = program.history.previous
        if warm is None and (previous is None or same_deploy(previous, self._failing)):
            return RollbackWay()
        command = shown_command(previous.command) if previous is not None else None
        number = warm.number if warm is not None else None
        return RollbackWay(number, command, rolled_back_from=program.rolled_back)

    def rollback_target(self) -> Generation | None:
        """The generation kept warm, if it runs what ``rollback`` deploys (the previous deploy):
        that rollback routes back to it with no cold start (``Flips._deploy``)."""
        program = self.program
        warm = program.warm
        if warm is None or not same_deploy(warm.config, program.history.previous):
            return None
        return warm

    def stop_if_given_up(self, exiting: Worker | None = None) -> None:
        """Begin ``_stop_given_up`` if nothing of the serving generation runs or will run again
        (``exiting``: a worker about to stop for good), unless a flip may still replace it: its
        outcome is its own (it may route back to what it replaced: ``Retirement.held``)."""
        program = self.program
        gen = program.serving
        if gen is None or program.stops_under_way:
            return
        if program.current_flip is not None:
            program.retirement.notice_given_up(gen, exiting)
            return
        if program.running and gen.given_up(exiting):
            fatal = program.fatal_reason is not None
            program.task_group().start_soon(self._stop_given_up, gen, exiting, fatal)

    async def _stop_given_up(
        self, gen: Generation, exiting: Worker | None = None, fatal: bool = False
    ) -> None:
        """Stop the program once its serving generation has no worker left and none to come
        (policy ``never``, ``on-failure`` after a clean exit, or ``fatal``). Left open, its
        socket would take the proxy's connections into a backlog nobody reads, each waiting for
        the proxy's timeout; closed, they are refused at once (a 502, or the next upstream).
        ``start`` starts it again, as a new generation.

        The generation kept warm for a rollback stays warm for the rest of its window: it is what
        ``rollback_window`` is for (a release that fails after its flip), and ``rollback`` routes
        back to it at once. A ``stop``, or the window's end, drains it as ever."""
        program = self.program
        if (
            program.serving is not gen
            or program.current_flip is not None
            or program.stops_under_way
        ):
            return  # a flip or a stop took over meanwhile
        if (fatal and program.fatal_reason is None) or not gen.given_up(exiting):
            # A `start` since it was found given up (an orphan's reaping may find it so just
            # before one): fatal cleared, its slots revived. Nothing to stop.
            return
        why = program.fatal_reason or "every worker exited and the restart policy starts none again"
        warm = self.rollback_target()
        steps = next_steps(program.name, why, self._rollback_way())
        program.runtime.events.emit(
            "given-up",
            program.name,
            gen.number,
            f"{why}: stopping it (its socket closes){self.holders_stopped(gen)}; "
            f"{'; '.join(steps)}",
        )
        # Kept only if a rollback would route back to it: one of an older deploy serves nothing.
        await program.stop(keep_warm=warm is not None)

    def holders_stopped(self, gen: Generation) -> str:
        """What the ``given-up`` event adds for the processes that ``gen``'s workers left holding
        its socket outside their process groups (daemonized), stopped with it: without them, it
        would say its socket closes while they accept on it until the shutdown. Not while a
        generation kept warm on the same fixed port shares the socket: it stays open anyway,
        and a holder could be that generation's."""
        inode = socket_inode(gen.socket)
        if inode is None or any(
            socket_inode(other.socket) == inode
            for other in self.program.generations
            if other is not gen
        ):
            return ""
        # An adopted socket is the previous supervisor's workers' too: not left by ours.
        left = self.program.leftovers
        known = frozenset(w.pid for w in left.workers) if left is not None else frozenset()
        holders = SocketHolders(inode, self.program.runtime.reaper.claimed, known)
        gen.drain_socket_holders(holders)  # one that only a later exit hands to us, too
        if not (pids := holders.pids()):
            return ""
        listed = ", ".join(map(str, pids))
        return (
            f", and what its workers left holding that socket outside their process groups "
            f"(daemonized: PID {listed}; the `orphans-stopping` events name each one stopped)"
        )
