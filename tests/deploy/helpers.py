"""Readers for the deploy files: a Dockerfile instruction parser, .dockerignore matching (Docker's
rules: patterns in order, the last match wins, `!` re-includes), YAML documents, and the server's own
argument parser to check that every `steerserve serve` flag used in deploy/ exists."""

from __future__ import annotations

import argparse
import fnmatch
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    value: str  # the rest of the (joined) line
    line: int

    def json_args(self) -> list[str] | None:
        """The exec form (`["a", "b"]`) as a list, or None for the shell form."""
        import json

        text = self.value.strip()
        return json.loads(text) if text.startswith("[") else None


def dockerfile(path: Path = ROOT / "Dockerfile") -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped (as Docker does)."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        out.append(Instruction(keyword.upper(), rest.strip(), start))
        pending = ""
    return out


def stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    """Instructions per build stage, keyed by the stage's `AS` name (or its index)."""
    out: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for ins in instructions:
        if ins.keyword == "FROM":
            parts = ins.value.split()
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else str(len(out))
            current = out.setdefault(name, [])
        if current is not None:
            current.append(ins)
    return out


def dockerignore_excludes(relpath: str, path: Path = ROOT / ".dockerignore") -> bool:
    """Whether the build context leaves `relpath` out (a path excluded itself or through a parent)."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        rules.append((negate, pattern.strip("/")))
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for prefix in prefixes:  # a parent's verdict holds for its children unless a rule matches them
        for negate, pattern in rules:
            if _match(pattern, prefix):
                excluded = not negate
    return excluded


def _match(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):
        rest = pattern[3:]
        segments = path.split("/")
        return any(_match(rest, "/".join(segments[i:])) for i in range(len(segments)))
    return fnmatch.fnmatchcase(path, pattern) and path.count("/") == pattern.count("/")


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def parse_serve_flags(flags: list[str]):
    """The server's Config for these `steerserve serve` flags, by the server's own parser."""
    from steerserve.cli import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="steerserve serve")
    add_serve_arguments(parser)
    args, unknown = parser.parse_known_args(flags)
    if unknown:
        raise ValueError(f"`steerserve serve` has no flags {unknown}")
    return config_from_args(args)


def compose_interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """`${VAR:-default}` / `${VAR}` as compose substitutes them (from `env`, else the default)."""
    env = env or {}

    def sub(m: re.Match) -> str:
        return env.get(m.group(1), m.group(3) if m.group(3) is not None else "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, text)


def tool(name: str, module: str | None = None) -> list[str] | None:
    """The command line of a checker installed from PyPI (on PATH, or as `python -m module`)."""
    found = shutil.which(name)
    if found:
        return [found]
    if module:
        probe = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True)
        if probe.returncode == 0:
            return [sys.executable, "-m", module]
    return None
