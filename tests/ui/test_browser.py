"""The web UI in a real browser: headless Debian chromium driven by Playwright against the API app
(uvicorn, real catalog, real argon2/JWT). Screenshots of each page go to test-artifacts/ui/."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from apiserver import serving

from iot2ml.auth.store import Devices
from iot2ml.auth.users import Users
from iot2ml.core.catalog import Catalog

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
PASSWORD = "ui-password-123"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (README's test command does)")
    return path


@pytest.fixture
def ui(settings) -> Iterator[str]:
    catalog = Catalog(settings.catalog)
    Users(catalog).add_user("ana", PASSWORD, "viewer")
    devices = Devices(catalog)
    for i in range(120):
        devices.add_device(f"pump-{i:03d}", "pump")
    devices.add_device("wine-1", "wine")
    devices.remove_device("pump-007")
    with serving(settings) as url:
        yield url
    catalog.close()


def test_sign_in_and_the_fleet_page(ui):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(ui + "/")  # the root redirects to the UI
            assert page.url.endswith("/ui/")
            page.get_by_label("Username").fill("ana")
            page.get_by_label("Password").fill("not-the-password")
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("alert")).to_contain_text("wrong user name or password")
            page.screenshot(path=str(ARTIFACTS / "sign-in.png"))

            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_text("121 devices (pump: 120, wine: 1)")).to_be_visible()
            expect(page.get_by_text("ana (viewer)")).to_be_visible()
            expect(page.get_by_role("cell", name="pump-000")).to_be_visible()  # the first page of 50
            expect(page.get_by_role("cell", name="pump-050")).to_have_count(0)
            page.get_by_label("Search").fill("pump-007")
            page.get_by_label("Search").press("Enter")
            expect(page.get_by_text("1 devices (pump: 1)")).to_be_visible()
            expect(page.get_by_role("cell", name="revoked")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "fleet.png"))

            cookie = next(c for c in page.context.cookies() if c["name"] == "iot2ml_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert 0 < cookie["expires"] - time.time() <= 15 * 60 + 5  # the session ends with its token
            page.reload()  # still signed in
            expect(page.get_by_text("ana (viewer)")).to_be_visible()
            assert errors == []

            other = browser.new_page()  # no cookie: the sign-in form, never the fleet
            other.goto(ui + "/ui/fleet")
            expect(other.get_by_role("button", name="Sign in")).to_be_visible()
            expect(other.get_by_text("devices (")).to_have_count(0)
        finally:
            browser.close()
