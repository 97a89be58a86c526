"""Fixtures of the fault drills, and the table of their reports at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from claim_service.local.embedded import EmbeddedValkey
from tests.drills.harness import REPORTS


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    """A Valkey of the drill's own (it is killed, frozen and restarted), keeping an AOF
    fsynced on every write so ``CLAIM_DURABILITY=local`` can be honoured."""
    server = EmbeddedValkey(tmp_path / "valkey", appendfsync="always")
    server.start()
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORTS:
        return
    terminalreporter.section("fault drills")
    for report in sorted(REPORTS, key=lambda r: r.drill):
        terminalreporter.write_line(report.line())
