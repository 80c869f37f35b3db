"""Whether the kernel can exec a file's format, judged from its first bytes as execve() judges
them: a script whose ``#!`` line names an interpreter that is there, an ELF program this machine
runs, or a format an enabled binfmt_misc handler claims; and if not, why, in a sentence. Where
it cannot be certain (an ELF when this kernel's machine is not known, a ``#!`` chain past the
kernel's depth), it says nothing and leaves the file to the kernel: a false refusal would stop a
program that runs.

Why ask before the exec: every worker starts through spawn.py's ``/bin/sh`` exec shim, and a
POSIX shell whose ``exec`` gets ENOEXEC ("Exec format error") runs the file as a shell script
(dash and busybox re-exec ``/bin/sh FILE``, bash reads it itself; none can be told not to). A
file without a ``#!`` line would then have each of its lines run as a shell command, and a
command is never run through a shell. So a file the kernel would refuse is refused here, with
its reason, before the spawn.

What this cannot see: a file changed between this look and the exec (the shell's fallback is
back for that one start; the next start looks again); a binfmt_misc handler of a
``/proc/sys/fs/binfmt_misc`` not mounted here (in a container, say): such a file (an ELF of
another machine run by qemu, a ``.jar``) is refused, and its command names its interpreter
instead (``[qemu-aarch64, ./app]``, ``[java, -jar, app.jar]``). A file this user may not read
(mode 0711) is left to the kernel: an ELF runs without read permission, and a shell could not
read it either.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

HEADER_SIZE = 256  # what the kernel reads of the file to choose a format (BINPRM_BUF_SIZE)
# How deep #! interpreters that are scripts too are followed: the kernel's limit
# (BINPRM_MAX_RECURSION); past it the file is left to the kernel (its limit has changed, and it
# refuses with ELOOP, which no shell runs as a script).
MAX_INTERPRETER_DEPTH = 4
BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")
ELF_MAGIC = b"\x7fELF"
_ELF_PROGRAM_TYPES = (2, 3)  # ET_EXEC and ET_DYN: not an object file (ET_REL) or a core dump
_MACHINE_NAMES = {3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S/390", 40: "ARM",
                  62: "x86-64", 183: "AArch64", 243: "RISC-V"}  # fmt: skip
_ElfKind = tuple[int, int, int]  # (EI_CLASS, EI_DATA, e_machine)
_X86 = {(2, 1, 62), (1, 1, 3), (1, 1, 62)}  # x86-64, i386, x32
_ARM = {(2, 1, 183), (1, 1, 40)}  # AArch64, 32-bit ARM
_PPC = {(2, 2, 21), (1, 2, 20)}  # big-endian PowerPC64, PowerPC
# The ELF kinds a kernel runs by its own handler, by the machine it names: its programs
# and its 32-bit ones. A 32-bit name may be a 64-bit kernel under the linux32 personality (a
# 32-bit container), so it counts its 64-bit kind too. A machine not here (MIPS, with its o32,
# n32 and n64 and both byte orders, say) is left to the kernel.
_KERNEL_RUNS: dict[str, set[_ElfKind]] = {
    **dict.fromkeys(("x86_64", "i386", "i486", "i586", "i686"), _X86),
    **dict.fromkeys(("aarch64", "armv7l", "armv8l"), _ARM),
    **dict.fromkeys(("ppc64", "ppc"), _PPC),
    "ppc64le": {(2, 1, 21)},
    "s390x": {(2, 2, 22), (1, 2, 22)},
    "riscv64": {(2, 1, 243), (1, 1, 243)},
}


def exec_format_problem(path: Path, cwd: Path | None = None) -> str | None:
    """Why execve() would refuse the format of ``path`` (an executable file), or None.

    ``cwd`` is where a relative ``#!`` interpreter is looked for (the worker's folder; None:
    ours), as the kernel looks for it from the process's working directory.
    """
    said = ""  # which interpreter is meant, once it is one of the #! line's
    for _ in range(MAX_INTERPRETER_DEPTH + 1):
        header = _header(path)
        if header is None:
            return None
        if not header.startswith(b"#!"):
            problem = _binary_problem(header)
            # Asked last: a handler is rare, and finding none costs more than the rest.
            if problem is None or _binfmt_misc_claims(path, header):
                return None
            return said + problem
        if (interpreter := _interpreter(header)) is None:
            return f"{said}its #! line names no interpreter"
        path = interpreter if cwd is None else cwd / interpreter
        if not os.path.exists(path):
            return _missing_interpreter(interpreter)
        if (argument := _crlf_argument(header)) is not None:
            return said + argument
        said = f"its #! interpreter {interpreter}: "
        if not is_executable_file(path):
            return f"{said}not an executable file"
    return None  # deeper than MAX_INTERPRETER_DEPTH: the kernel judges


def is_executable_file(path: str | os.PathLike[str]) -> bool:
    """Whether exec could run ``path`` at all: this user may execute it and it is not a folder
    (which has the execute bit too). Its format is another question (``exec_format_problem``)."""
    return os.access(path, os.X_OK) and not os.path.isdir(path)


def _header(path: Path) -> bytes | None:
    """The first bytes of ``path``, as the kernel reads them; None when this user may not read
    it, or it is not a regular file (the kernel refuses that with its own, clear error)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # not opened: a FIFO would block, a device may act on an open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # replaced since the stat
        return os.pread(fd, HEADER_SIZE, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def _shebang_line(header: bytes) -> bytes:
    """The ``#!`` line of ``header`` after the ``#!``, as the kernel cuts it: at a newline or a
    NUL."""
    return header[2:].split(b"\n", 1)[0].split(b"\0", 1)[0]


def _interpreter(header: bytes) -> Path | None:
    """The interpreter a ``#!`` line names, as the kernel reads it: its first word ends at a
    space or a tab (not at a carriage return, say)."""
    line = _shebang_line(header)
    words = [word for word in line.replace(b"\t", b" ").split(b" ") if word]
    return Path(os.fsdecode(words[0])) if words else None


def _crlf_argument(header: bytes) -> str | None:
    """Why a ``#!`` line with an argument that ends in a carriage return fails, or None: the
    kernel hands the interpreter that argument with its ``\\r`` (``/usr/bin/env`` then looks for
    ``python3\\r``, ``sh`` refuses ``-e\\r``): a CRLF line, never meant."""
    line = _shebang_line(header)
    if not line.endswith(b"\r"):
        return None
    # The kernel passes everything after the interpreter as one argument, spaces included.
    words = re.split(rb"[ \t]+", line.lstrip(b" \t"), maxsplit=1)
    argument = words[1] if len(words) > 1 else b""
    if not argument.rstrip(b"\r"):
        return None  # an interpreter ending in "\r": _missing_interpreter says it
    return (
        "its #! line ends in a carriage return (CRLF line endings): the kernel passes its "
        f"interpreter the argument {os.fsdecode(argument)!r}, carriage return included"
    )


def _missing_interpreter(interpreter: Path) -> str:
    """Why a ``#!`` interpreter that is not there is missing, in a sentence."""
    if str(interpreter).endswith("\r"):  # the kernel looks for "/bin/sh\r": ENOENT
        return (
            "its #! line ends in a carriage return (CRLF line endings): the kernel looks for "
            f"the interpreter {str(interpreter)!r}, and there is no such file"
        )
    return f"its #! interpreter {interpreter}: no such file"


def _binary_problem(header: bytes) -> str | None:
    """Why the kernel's own handlers would refuse a file without a ``#!`` line, or None."""
    if header.startswith(ELF_MAGIC):
        return _elf_problem(header)
    return "not a program: no #! line naming its interpreter, and not a binary (exec format error)"


def _elf_problem(header: bytes) -> str | None:
    """Why the kernel would refuse this ELF file (a program of another machine, an object
    file), or None: also when it is not certain (see ``_machines_run_here``)."""
    if (kind := _elf_kind(header)) is None:
        return "an ELF file too short to be a program (exec format error)"
    if int.from_bytes(header[16:18], _byte_order(header)) not in _ELF_PROGRAM_TYPES:
        return "an ELF file that is not a program (an object file or a core dump, say)"
    if (runs := _machines_run_here()) is None or kind in runs:
        return None
    return (
        f"an ELF program for another machine ({_elf_name(kind)}; this kernel is "
        f"{_kernel_machine()}), and no binfmt_misc handler here runs it (exec format error)"
    )


def _machines_run_here() -> set[_ElfKind] | None:
    """The ELF kinds the kernel here runs by its own handler, or None when that is not certain
    (a false refusal stops a working program; a wrong "yes" gets the kernel's ENOEXEC, and
    dash and bash refuse to run a file with a NUL in its first line, as every ELF has, as a
    script).

    The kernel's machine counts, not our own program's: a 32-bit Python runs on a 64-bit
    kernel, which runs its 64-bit programs too. Not certain: a machine not known here; our own
    program not one that machine runs (Python run by qemu-user, say); a binfmt_misc handler
    that claims our own program (the same). Left unseen: Python run by qemu-user with neither
    ``kernel.arch`` nor binfmt_misc here, which names the emulated machine as the kernel's.
    """
    runs = _KERNEL_RUNS.get(_kernel_machine())
    own = _own_program()
    if runs is None or own is None or _elf_kind(own) not in runs:
        return None
    return None if _binfmt_misc_claims(Path(sys.executable), own) else runs


@functools.cache
def _kernel_machine() -> str:
    """The machine the kernel names: ``kernel.arch`` (Linux 6.1 on), which neither the linux32
    personality nor qemu-user changes, as ``uname -m`` they both do; else ``uname -m``."""
    try:
        return Path("/proc/sys/kernel/arch").read_text().strip()
    except OSError:
        return os.uname().machine


def _elf_kind(header: bytes) -> _ElfKind | None:
    """An ELF header's class (32 or 64-bit), byte order and machine, or None if it is none."""
    if not header.startswith(ELF_MAGIC) or len(header) < 20:
        return None
    return header[4], header[5], int.from_bytes(header[18:20], _byte_order(header))


def _byte_order(header: bytes) -> Literal["little", "big"]:
    return "little" if header[5] == 1 else "big"  # EI_DATA: 1 is ELFDATA2LSB


def _elf_name(kind: _ElfKind) -> str:
    bits = {1: "32-bit", 2: "64-bit"}.get(kind[0], f"class {kind[0]}")
    return f"{bits} {_MACHINE_NAMES.get(kind[2], f'machine {kind[2]}')}"


@functools.cache
def _own_program() -> bytes | None:
    """The first bytes of this very process's program (Python's ELF), or None."""
    return _header(Path("/proc/self/exe"))


def _binfmt_misc_claims(path: Path, header: bytes) -> bool:
    """Whether an enabled binfmt_misc handler would run ``path`` (by its magic bytes, or by its
    name's extension)."""
    try:
        if (BINFMT_MISC / "status").read_text().strip() != "enabled":
            return False
    except OSError:
        return False  # not mounted here: no handler is known
    return any(_handler_claims(fields, path, header) for fields in _handlers())


def _handlers() -> Iterator[dict[str, str]]:
    """Every enabled binfmt_misc handler, as its fields (``offset``, ``magic``, ``mask``,
    ``extension``)."""
    for entry in BINFMT_MISC.iterdir():
        if entry.name in ("status", "register"):
            continue
        try:
            lines = entry.read_text().splitlines()
        except OSError:
            continue
        if lines and lines[0] == "enabled":
            yield dict(line.partition(" ")[::2] for line in lines[1:])


def _handler_claims(fields: dict[str, str], path: Path, header: bytes) -> bool:
    if "extension" in fields:
        return path.name.endswith(fields["extension"]) and "." in path.name
    try:
        magic = bytes.fromhex(fields["magic"])
        mask = bytes.fromhex(fields.get("mask", "ff" * len(magic)))
        offset = int(fields.get("offset", "0"))
    except (KeyError, ValueError):
        return False
    found = header[offset : offset + len(magic)]
    return len(found) == len(magic) and all(
        f & m == g & m for f, m, g in zip(found, mask, magic, strict=False)
    )
