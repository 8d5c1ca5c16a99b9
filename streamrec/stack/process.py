"""Start, poll and stop server processes by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class StartupError(RuntimeError):
    """A server did not become ready; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free ports (all held open while they are picked, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def spawn(
    cmd: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> int:
    """Start `cmd` in its own session (so it outlives the CLI and its children die with it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc.pid


# Popen objects of processes started here, so that they are reaped rather than left as zombies.
_children: dict[int, subprocess.Popen] = {}


def pid_alive(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def log_tail(log_path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def wait_ready(
    name: str, pid: int, ready: Callable[[], bool], timeout: float, log_path: Path
) -> float:
    """Poll `ready()` until it holds; fail fast if the process dies. Returns seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not pid_alive(pid):
            tail = log_tail(log_path)
            raise StartupError(f"{name} exited during start-up. Log {log_path}:\n{tail}")
        with contextlib.suppress(Exception):
            if ready():
                return time.monotonic() - start
        time.sleep(0.05)
    stop(pid, grace=2)
    raise StartupError(
        f"{name} was not ready within {timeout:.0f} s and was killed. "
        f"Log {log_path}:\n{log_tail(log_path)}"
    )


def stop(pid: int, grace: float = 15.0) -> None:
    """SIGTERM, SIGKILL after `grace` seconds, then kill whatever is left of its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # the group: server and any children (Triton stubs)
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc = _children.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (to check that nothing was left behind)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members
