"""Headless Chromium for the browser tests: Debian's ``chromium`` (``./run test`` installs
it), driven by Playwright. Playwright cannot download browsers here, and need not: it drives
the system's. A missing browser fails the tests, never skips them."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

ARTIFACTS = Path(
    os.environ.get("CLAIM_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """``CLAIM_CHROMIUM``, else ``chromium`` (or ``chromium-browser``) on the PATH."""
    found = os.environ.get("CLAIM_CHROMIUM") or shutil.which("chromium")
    found = found or shutil.which("chromium-browser")
    if not found:
        pytest.fail(
            "the browser tests need Chromium: `./run test` installs Debian's `chromium` "
            "(apt-get, as root), or point CLAIM_CHROMIUM at a Chromium binary",
            pytrace=False,
        )
    return found


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium_path, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def artifacts() -> Path:
    """Where a test leaves what a person may want to look at (not tracked by git)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
