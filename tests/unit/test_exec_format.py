"""exec_format.py against real files: which formats the kernel would exec (a #! script, an ELF
program of this machine), and why not the others (no #! line, a missing interpreter, an ELF of
another machine), unless a binfmt_misc handler claims them."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flipvisor import exec_format
from flipvisor.exec_format import exec_format_problem

NO_SHEBANG = "not a program: no #! line naming its interpreter, and not a binary"
EM_AARCH64, EM_X86_64, EM_RISCV = 183, 62, 243
ET_REL, ET_EXEC = 1, 2


HOST_BINFMT_MISC = exec_format.BINFMT_MISC


@pytest.fixture
def no_binfmt_handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No binfmt_misc handler is seen (a CI host may have qemu's registered, running every
    machine's ELF): the premise of a test that a format is refused."""
    empty = tmp_path / "no-binfmt_misc"
    empty.mkdir()
    monkeypatch.setattr(exec_format, "BINFMT_MISC", empty)


def confirm_the_kernel_refuses(path: Path) -> None:
    """What the kernel says of ``path`` (Python's exec does not fall back to a shell), unless a
    binfmt_misc handler of this host runs it."""
    with pytest.MonkeyPatch.context() as host:
        host.setattr(exec_format, "BINFMT_MISC", HOST_BINFMT_MISC)
        if exec_format._binfmt_misc_claims(path, path.read_bytes()[: exec_format.HEADER_SIZE]):
            return
    with pytest.raises(OSError, match="Exec format error"):
        subprocess.run([path], check=False)


def executable(path: Path, content: bytes | str) -> Path:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    path.chmod(0o755)
    return path


def elf_header(bits: int, machine: int, elf_type: int = ET_EXEC, big_endian: bool = False) -> bytes:
    """An ELF header's first 64 bytes, as much of one as the kernel needs to choose a handler."""
    ident = b"\x7fELF" + bytes([bits // 32, 2 if big_endian else 1, 1]) + bytes(9)
    return ident + struct.pack(">HH" if big_endian else "<HH", elf_type, machine) + bytes(44)


def native_machine() -> int:
    header = Path(os.path.realpath(sys.executable)).read_bytes()[:20]
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def other_machine() -> int:
    return EM_RISCV if native_machine() != EM_RISCV else EM_X86_64


def test_a_script_with_an_interpreter_and_a_program_of_this_machine_run(tmp_path: Path) -> None:
    assert exec_format_problem(executable(tmp_path / "script", "#!/bin/sh\necho hi\n")) is None
    assert exec_format_problem(executable(tmp_path / "env", "#! /usr/bin/env python3\n")) is None
    assert exec_format_problem(Path(os.path.realpath(sys.executable))) is None
    assert exec_format_problem(Path("/bin/sh")) is None


@pytest.mark.usefixtures("no_binfmt_handlers")
def test_a_file_without_an_interpreter_line_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = executable(tmp_path / "lost-shebang", f"touch {marker}\n")
    data = executable(tmp_path / "data", bytes(range(256)))
    empty = executable(tmp_path / "empty", b"")
    for refused in (script, data, empty):
        problem = exec_format_problem(refused)
        assert problem is not None and problem.startswith(NO_SHEBANG), problem
        confirm_the_kernel_refuses(refused)
    assert not marker.exists()


@pytest.mark.usefixtures("no_binfmt_handlers")
def test_an_elf_of_another_machine_or_not_a_program_is_refused(tmp_path: Path) -> None:
    other = executable(tmp_path / "other", elf_header(64, other_machine()))
    problem = exec_format_problem(other)
    assert problem is not None and problem.startswith("an ELF program for another machine ("), (
        problem
    )
    assert problem.endswith("and no binfmt_misc handler here runs it (exec format error)")
    big_endian = executable(tmp_path / "be", elf_header(64, native_machine(), big_endian=True))
    if sys.byteorder == "little":
        assert "another machine" in (exec_format_problem(big_endian) or "")
    object_file = executable(tmp_path / "object", elf_header(64, native_machine(), ET_REL))
    assert exec_format_problem(object_file) == (
        "an ELF file that is not a program (an object file or a core dump, say)"
    )
    truncated = executable(tmp_path / "truncated", b"\x7fELF\x02\x01")
    assert exec_format_problem(truncated) == (
        "an ELF file too short to be a program (exec format error)"
    )
    for refused in (other, object_file, truncated):
        confirm_the_kernel_refuses(refused)


@pytest.mark.usefixtures("no_binfmt_handlers")
def test_a_64_bit_kernel_runs_its_32_bit_programs(tmp_path: Path) -> None:
    if native_machine() != EM_X86_64:
        pytest.skip("x86-64 only")
    assert exec_format_problem(executable(tmp_path / "i386", elf_header(32, 3))) is None
    assert exec_format_problem(executable(tmp_path / "x32", elf_header(32, EM_X86_64))) is None
    assert exec_format_problem(executable(tmp_path / "arm64", elf_header(64, EM_AARCH64))) == (
        "an ELF program for another machine (64-bit AArch64; this kernel is x86_64), "
        "and no binfmt_misc handler here runs it (exec format error)"
    )


@pytest.mark.usefixtures("no_binfmt_handlers")
def test_the_kernels_machine_counts_not_pythons_and_an_unknown_one_is_left_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 32-bit Python (an i386 or armhf userland) on a 64-bit kernel: the kernel runs 64-bit
    programs too. A kernel not known here (MIPS) or a Python it does not run (qemu-user): not
    certain, so left to the kernel. Python's program and the kernel's machine are our seams."""
    x86_64 = executable(tmp_path / "x86-64", elf_header(64, EM_X86_64))
    arm64 = executable(tmp_path / "arm64", elf_header(64, EM_AARCH64))
    riscv = executable(tmp_path / "riscv", elf_header(64, EM_RISCV))

    def here(kernel: str, python: bytes) -> None:
        monkeypatch.setattr(exec_format, "_kernel_machine", lambda: kernel)
        monkeypatch.setattr(exec_format, "_own_program", lambda: python)

    here("x86_64", elf_header(32, 3))  # i386 Python
    assert exec_format_problem(x86_64) is None
    assert "another machine (64-bit AArch64; this kernel is x86_64)" in (
        exec_format_problem(arm64) or ""
    )
    here("i686", elf_header(32, 3))  # the same under the linux32 personality
    assert exec_format_problem(x86_64) is None
    for kernel in ("aarch64", "armv8l"):  # armhf Python
        here(kernel, elf_header(32, 40))
        assert exec_format_problem(arm64) is None
        assert "another machine" in (exec_format_problem(riscv) or "")
    here("mips64", elf_header(32, 8, big_endian=True))
    assert exec_format_problem(riscv) is None
    here("x86_64", elf_header(64, EM_AARCH64))  # aarch64 Python run by qemu-user
    assert exec_format_problem(riscv) is None


def test_a_python_a_binfmt_misc_handler_runs_leaves_elf_programs_to_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler that claims our own program: we may be run by qemu, on a kernel of another
    machine, so no ELF is judged foreign."""
    binfmt = tmp_path / "binfmt_misc"
    binfmt.mkdir()
    (binfmt / "status").write_text("enabled\n")
    own = Path(os.path.realpath(sys.executable)).read_bytes()[:20]
    (binfmt / "us").write_text(f"enabled\ninterpreter /usr/bin/qemu\noffset 0\nmagic {own.hex()}\n")
    monkeypatch.setattr(exec_format, "BINFMT_MISC", binfmt)
    other = executable(tmp_path / "other", elf_header(64, other_machine()))
    assert exec_format_problem(other) is None
    (binfmt / "us").write_text("disabled\n")
    assert "another machine" in (exec_format_problem(other) or "")


@pytest.mark.usefixtures("no_binfmt_handlers")
def test_a_missing_or_unusable_interpreter_is_named(tmp_path: Path) -> None:
    def problem(first_line: str, cwd: Path | None = None) -> str | None:
        return exec_format_problem(executable(tmp_path / "script", first_line + "\n"), cwd)

    assert (
        problem("#!/no/such/interpreter -x")
        == "its #! interpreter /no/such/interpreter: no such file"
    )
    assert problem("#!   ") == "its #! line names no interpreter"
    assert problem(f"#!{tmp_path}") == f"its #! interpreter {tmp_path}: not an executable file"
    lost = executable(tmp_path / "lost-shebang", "echo hi\n")
    assert problem(f"#!{lost}") == f"its #! interpreter {lost}: {NO_SHEBANG} (exec format error)"
    # Nested interpreters are followed; a relative one is looked for in the worker's folder.
    executable(tmp_path / "middle", "#!/bin/sh\n")
    assert problem(f"#!{tmp_path / 'middle'}") is None
    (tmp_path / "bin").mkdir()
    executable(tmp_path / "bin" / "tool", "#!/bin/sh\n")
    assert problem("#!bin/tool", cwd=tmp_path) is None
    assert (
        problem("#!bin/tool", cwd=tmp_path / "bin") == "its #! interpreter bin/tool: no such file"
    )


def test_interpreters_nested_to_the_kernels_depth_run_and_deeper_is_left_to_it(
    tmp_path: Path,
) -> None:
    """Four #! scripts as interpreters of a fifth run (the kernel's limit); past that the kernel
    refuses with ELOOP, not ENOEXEC (no shell runs the file then), and its limit has changed over
    versions: that is left to it."""
    marker = tmp_path / "ran"
    previous = executable(tmp_path / "0", f"#!/bin/sh\ntouch {marker}\n")
    for depth in range(1, 5):
        previous = executable(tmp_path / str(depth), f"#!{previous}\n")
    assert exec_format_problem(previous) is None
    subprocess.run([previous], check=True)
    assert marker.exists()
    for depth in range(5, 8):
        previous = executable(tmp_path / str(depth), f"#!{previous}\n")
    assert exec_format_problem(previous) is None
    # Within the depth, a missing interpreter is still found.
    (tmp_path / "0").unlink()
    executable(tmp_path / "0", "#!/no/such/shell\n")
    assert exec_format_problem(tmp_path / "4") == "its #! interpreter /no/such/shell: no such file"


def test_the_interpreter_line_is_cut_as_the_kernel_cuts_it(tmp_path: Path) -> None:
    """The line ends at a newline or a NUL; its words are split at spaces and tabs only, so a
    CRLF line's interpreter ends in a carriage return (the kernel looks for "/bin/sh\\r")."""
    marker = tmp_path / "ran"
    nul = executable(tmp_path / "nul", f"#!/bin/sh\0junk\ntouch {marker}\n")
    assert exec_format_problem(nul) is None
    subprocess.run([nul], check=True)
    assert marker.exists()
    assert exec_format_problem(executable(tmp_path / "tab", "#!\t/bin/sh\t-e\n")) is None
    crlf = executable(tmp_path / "crlf", "#!/bin/sh\r\necho hi\r\n")
    assert exec_format_problem(crlf) == (
        "its #! line ends in a carriage return (CRLF line endings): the kernel looks for the "
        "interpreter '/bin/sh\\r', and there is no such file"
    )
    with pytest.raises(FileNotFoundError):
        subprocess.run([crlf], check=False)
    form_feed = executable(tmp_path / "ff", "#!/bin/sh\f-e\n")
    assert exec_format_problem(form_feed) == "its #! interpreter /bin/sh\x0c-e: no such file"


def test_a_crlf_line_with_an_argument_is_named(tmp_path: Path) -> None:
    """``#!/usr/bin/env python3`` with CRLF endings: env exists, but the kernel hands it
    "python3\\r", which it does not find (exit 127 at every restart): refused before the spawn,
    as the CRLF line whose interpreter ends in the carriage return."""
    env_line = executable(tmp_path / "env", "#!/usr/bin/env sh\r\necho hi\r\n")
    assert exec_format_problem(env_line) == (
        "its #! line ends in a carriage return (CRLF line endings): the kernel passes its "
        "interpreter the argument 'sh\\r', carriage return included"
    )
    assert subprocess.run([env_line], check=False, capture_output=True).returncode == 127
    option = executable(tmp_path / "option", "#! /bin/sh  -e \t\r\ntrue\r\n")
    assert exec_format_problem(option) == (
        "its #! line ends in a carriage return (CRLF line endings): the kernel passes its "
        "interpreter the argument '-e \\t\\r', carriage return included"
    )
    # A carriage return within the line, not at its end, is the script's own business.
    assert exec_format_problem(executable(tmp_path / "inner", "#!/bin/sh -e\r -x\n")) is None


def test_a_file_this_user_may_not_read_is_left_to_the_kernel(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    unreadable = executable(tmp_path / "secret", "echo hi\n")
    unreadable.chmod(0o111)
    assert exec_format_problem(unreadable) is None


def test_a_binfmt_misc_handler_claims_a_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from a binfmt_misc folder as the kernel shows it (here a copy: registering a handler
    takes root and changes the whole host)."""
    binfmt = tmp_path / "binfmt_misc"
    binfmt.mkdir()
    (binfmt / "status").write_text("enabled\n")
    (binfmt / "register").write_text("")
    machine = other_machine().to_bytes(2, "little").hex()
    (binfmt / "qemu").write_text(
        "enabled\ninterpreter /usr/bin/qemu-static\nflags: F\noffset 0\n"
        f"magic 7f454c460201010000000000000000000200{machine}\n"
        "mask ffffffffffffff00fffffffffffffffffeffffff\n"
    )
    (binfmt / "jar").write_text("enabled\ninterpreter /usr/bin/jexec\nflags: \nextension .jar\n")
    (binfmt / "off").write_text("disabled\ninterpreter /x\nflags: \noffset 0\nmagic 4142\n")
    monkeypatch.setattr(exec_format, "BINFMT_MISC", binfmt)
    other = executable(tmp_path / "other", elf_header(64, other_machine()))
    jar = executable(tmp_path / "app.jar", b"PK\x03\x04")
    disabled = executable(tmp_path / "ab", b"AB")
    assert exec_format_problem(other) is None
    assert exec_format_problem(jar) is None
    assert (exec_format_problem(disabled) or "").startswith(NO_SHEBANG)
    (binfmt / "status").write_text("disabled\n")
    assert (exec_format_problem(jar) or "").startswith(NO_SHEBANG)
