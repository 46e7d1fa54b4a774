"""CPU time of a NovaInfer server's processes by role, read from /proc.

A served step's cost is not only the engine core's: the tokenizer pool detokenizes every
step's message and the gateway turns it into SSE, on the same cores as the engine's threads.
`roles(pid)` splits the launcher's process tree into the engine core(s), the tokenizer pool
(its worker processes included), the gateway and the launcher itself, and gives each one's
user + system CPU seconds so far; the difference of two readings, divided by the engine
steps between them (/metrics), is each process's CPU per served step.
"""

from __future__ import annotations

import os

ROLES = ("engine_core", "tokenizer_pool", "gateway", "launcher")
_HZ = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, utime + stime in clock ticks, command line)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        out[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]), cmd)
    return out


def role_of(cmdline: str) -> str | None:
    """The service a process runs (`python -m services.X`), or None for anything else."""
    for role in ROLES[:3]:
        if f"services.{role}" in cmdline:
            return role
    return None


def roles(root_pid: int) -> dict[str, float]:
    """CPU seconds so far of each role in root_pid's tree: a process counts for the nearest
    ancestor (itself included) that runs a service, else for the launcher (root_pid)."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    totals = dict.fromkeys(ROLES, 0.0)
    todo = [(root_pid, "launcher")]
    while todo:
        pid, inherited = todo.pop()
        if pid not in procs:
            continue
        _, ticks, cmd = procs[pid]
        role = role_of(cmd) or inherited
        totals[role] += ticks / _HZ
        todo += [(c, role) for c in children.get(pid, [])]
    return totals


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}
