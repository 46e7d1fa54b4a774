"""Readers for the deployment files the tests check without a Docker engine: pins.env, the
Dockerfile (instructions by stage) and .dockerignore (Docker's matching rules)."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PINS = ROOT / "pins.env"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def read_pins(path: Path = PINS) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            pins[key] = value
    return pins


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined

    def exec_form(self) -> list[str] | None:
        """The JSON-array form's words (CMD ["a", "b"]), or None for the shell form."""
        text = self.args
        for flag in re.findall(r"^(--\S+\s+)", text):  # HEALTHCHECK --interval=... CMD [...]
            text = text[len(flag) :]
        m = re.search(r"\[(.*)\]\s*$", text)
        if m is None:
            return None
        return [w.strip().strip('"') for w in m.group(1).split(",")]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str | None]:
        """ARG name -> default (None without one)."""
        out: dict[str, str | None] = {}
        for i in self.all("ARG"):
            name, _, default = i.args.partition("=")
            out[name.strip()] = default.strip() if default else None
        return out

    def env(self) -> dict[str, str]:
        out = {}
        for i in self.all("ENV"):
            for word in shlex.split(i.args):
                key, _, value = word.partition("=")
                out[key] = value
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _logical_lines(text: str) -> Iterator[str]:
    buf: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue  # comments, also those inside a continued instruction, as Docker does
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        yield " ".join(p for p in buf if p)
        buf = []
    if buf:
        yield " ".join(buf)


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        ins = Instruction(keyword.upper(), rest.strip())
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert ins.keyword == "ARG", f"only ARG may come before the first FROM, not {line!r}"
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip() if default else None
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(global_args, stages)


def run_mount_sources(ins: Instruction) -> list[tuple[str | None, str]]:
    """(from stage or None for the build context, source) of each --mount=type=bind of a RUN."""
    out = []
    for spec in re.findall(r"--mount=(\S+)", ins.args):
        opts = dict(kv.split("=", 1) for kv in spec.split(","))
        if opts.get("type") == "bind":
            out.append((opts.get("from"), opts.get("source", ".")))
    return out


class DockerIgnore:
    """Docker's .dockerignore rules: patterns relative to the context root, `**` for any
    number of directories, a `!` pattern re-includes, and the last matching pattern wins;
    a pattern that matches a directory matches everything under it."""

    def __init__(self, path: Path = DOCKERIGNORE) -> None:
        self.patterns: list[tuple[bool, str]] = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
            self.patterns.append((negate, pattern))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out

    def _matches(self, pattern: str, path: str) -> bool:
        parts = path.split("/")
        regex = self._regex(pattern)
        # A path matches when it or one of its parent directories does.
        return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))

    def excluded(self, path: str) -> bool:
        result = False
        for negate, pattern in self.patterns:
            if self._matches(pattern, path):
                result = not negate
        return result

    def context_files(self, root: Path = ROOT) -> list[str]:
        """The files `docker build` would send from root, as relative paths."""
        keep = [p for neg, p in self.patterns if neg]
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            # Skip excluded directories that no `!` pattern reaches into.
            dirnames[:] = [
                d
                for d in dirnames
                if not self.excluded(rel_dir + d) or any(k.startswith(rel_dir + d + "/") for k in keep)
            ]
            files += [rel_dir + f for f in filenames if not self.excluded(rel_dir + f)]
        return sorted(files)
