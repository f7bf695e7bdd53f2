"""Parsing of the guest's machine-readable serial lines (format documented in guest/init.sh)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Anchored anywhere in the line: SeaBIOS leaves escape sequences without a newline before it.
LINE_RE = re.compile(r"VHOSTMEM-(TEST|DIGEST|SYNC|VERDICT|INFO) ?(.*)$")
PASS, FAIL = "PASS", "FAIL"


@dataclass(frozen=True)
class Check:
    """One verdict, from the guest (``r1.pattern-read``) or from the host (``host.image``)."""

    name: str
    passed: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{PASS if self.passed else FAIL} {self.name} {self.detail}".rstrip()


@dataclass
class GuestLog:
    """Accumulates what the guest reported; ``feed`` returns a sync tag when the guest waits."""

    checks: list[Check] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    info: list[str] = field(default_factory=list)
    verdict: str | None = None
    lines: list[str] = field(default_factory=list)

    def feed(self, line: str) -> str | None:
        self.lines.append(line)
        match = LINE_RE.search(line)
        if not match:
            return None
        kind, rest = match.group(1), match.group(2).strip()
        if kind == "TEST":
            self._test(rest)
        elif kind == "DIGEST":
            round_name, _, digest = rest.partition(" ")
            self.digests[round_name] = digest.strip()
        elif kind == "VERDICT":
            self.verdict = rest
        elif kind == "INFO":
            self.info.append(rest)
        elif kind == "SYNC":
            return rest
        return None

    def _test(self, rest: str) -> None:
        parts = rest.split(" ", 2)
        if len(parts) < 2 or parts[1] not in (PASS, FAIL):
            self.checks.append(Check("guest.malformed-line", False, rest))
            return
        detail = parts[2] if len(parts) > 2 else ""
        self.checks.append(Check(parts[0], parts[1] == PASS, detail))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)
