"""Whether the kernel can exec a file's format, judged from its first bytes as execve() judges
them: a script whose ``#!`` line names an interpreter that is there, an ELF program this machine
runs, or a format an enabled binfmt_misc handler claims; and if not, why, in a sentence.

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
import stat
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
# (EI_CLASS, EI_DATA, e_machine) a 64-bit kernel also runs, by its own: its 32-bit programs.
_COMPAT_ELF = {
    (2, 1, 62): {(1, 1, 3), (1, 1, 62)},  # x86-64: i386, x32
    (2, 1, 183): {(1, 1, 40)},  # AArch64: 32-bit ARM
    (2, 2, 21): {(1, 2, 20)},  # big-endian PowerPC64: PowerPC
    (2, 2, 22): {(1, 2, 22)},  # s390x: s390
}

_ElfKind = tuple[int, int, int]


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
        said = f"its #! interpreter {interpreter}: "
        if not os.access(path, os.X_OK) or os.path.isdir(path):
            return f"{said}not an executable file"
    return None  # deeper than MAX_INTERPRETER_DEPTH: the kernel judges


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


def _interpreter(header: bytes) -> Path | None:
    """The interpreter a ``#!`` line names, as the kernel reads it: the line ends at a newline
    or a NUL, and its first word at a space or a tab (not at a carriage return, say)."""
    line = header[2:].split(b"\n", 1)[0].split(b"\0", 1)[0]
    words = [word for word in line.replace(b"\t", b" ").split(b" ") if word]
    return Path(os.fsdecode(words[0])) if words else None


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
    file), or None."""
    if (kind := _elf_kind(header)) is None:
        return "an ELF file too short to be a program (exec format error)"
    if (native := _native_elf()) is None:
        return None  # our own ELF is unknown: the kernel judges
    if int.from_bytes(header[16:18], _byte_order(header)) not in _ELF_PROGRAM_TYPES:
        return "an ELF file that is not a program (an object file or a core dump, say)"
    if kind == native or kind in _COMPAT_ELF.get(native, set()):
        return None
    return (
        f"an ELF program for another machine ({_elf_name(kind)}; this one runs "
        f"{_elf_name(native)}), and no binfmt_misc handler here runs it (exec format error)"
    )


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
def _native_elf() -> _ElfKind | None:
    """The ELF kind of this very process's program (the machine it runs on), or None."""
    header = _header(Path("/proc/self/exe"))
    return None if header is None else _elf_kind(header)


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
