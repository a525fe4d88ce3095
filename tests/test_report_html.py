"""report.html in a real headless browser (Debian's chromium), driven over the DevTools protocol.

The protocol runs over a pipe (`--remote-debugging-pipe`: commands on fd 3, replies on fd 4, JSON
messages ending in NUL), so the test needs no extra Python package and opens no network port. Each
test loads a page, collects console errors / uncaught exceptions / failed loads, checks that the
summary, the per-layer table, the plots and a counterexample image are laid out and visible, and
takes a screenshot that must not be blank.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from prunecert.reports import write_report
from prunecert.reports.sample import sample_audit

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="chromium not installed (apt-get install chromium)")


class Browser:
    """A minimal DevTools-protocol client for one headless chromium over fds 3/4."""

    def __init__(self, profile: Path, timeout: float = 60.0):
        if CHROMIUM is None:
            pytest.fail("chromium is required for the HTML report test (apt-get install chromium)")
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        cmd = " ".join(f"'{a}'" for a in args) + f" 3<&{to_browser_r} 4>&{from_browser_w}"
        self.proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], pass_fds=(to_browser_r, from_browser_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.timeout, self._buf, self._next, self.events = timeout, b"", 0, []
        self.session = None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        while True:
            ev = self._read_message(deadline)
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def open(self, url: str, width: int = 1280, height: int = 1000) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions, failed resource loads seen so far."""
        self.send("Runtime.evaluate", {"expression": "1"})  # flush events queued before now
        out = []
        for ev in self.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
            elif m == "Network.loadingFailed":
                out.append("load failed: " + p.get("errorText", ""))
        return out

    def evaluate(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self) -> bytes:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


VISIBLE = """(() => {
  const shown = el => { if (!el) return false; const r = el.getBoundingClientRect(); const s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none' && s.opacity !== '0'; };
  const all = sel => Array.from(document.querySelectorAll(sel));
  return {
    verdict: shown(document.querySelector('#summary .verdict')),
    verdictText: (document.querySelector('#summary .verdict h2') || {}).textContent,
    layerRows: all('#layer-table tbody tr').filter(shown).length,
    plots: all('svg.plot').filter(el => shown(el) && el.querySelectorAll('path, text, use').length > 5).length,
    images: all('img.cex-input').filter(el => shown(el) && el.complete && el.naturalWidth > 0).length,
    brokenImages: all('img').filter(el => !(el.complete && el.naturalWidth > 0)).length,
    external: all('[src], link[href], script[src]').map(el => el.getAttribute('src') || el.getAttribute('href'))
              .filter(u => !u.startsWith('data:')),
  };
})()"""


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_report_renders_in_browser(tmp_path, browser):
    audit = sample_audit(violated=True)
    write_report(audit, tmp_path / "r")
    browser.open((tmp_path / "r" / "report.html").as_uri())
    state = browser.evaluate(VISIBLE)
    assert browser.errors() == []
    assert state["verdict"] and state["verdictText"].strip() == "VIOLATED"
    assert state["layerRows"] == len(audit.layers)
    assert state["plots"] == len(audit.layers) + 1  # one per layer + deviation vs radius
    assert state["images"] == len(audit.counterexamples)
    assert state["brokenImages"] == 0
    assert state["external"] == []  # self-contained: nothing to fetch
    img = _pixels(browser.screenshot())
    assert img.shape[0] > 1000 and img.shape[1] >= 1000
    assert img.std() > 20 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank
    red = (np.abs(img.astype(int) - [0xc6, 0x28, 0x28]).sum(axis=2) < 30).sum()
    assert red > 5000  # the VIOLATED banner is painted


def test_certified_report_shows_green_banner(tmp_path, browser):
    write_report(sample_audit(violated=False), tmp_path / "r")
    browser.open((tmp_path / "r" / "report.html").as_uri())
    assert browser.evaluate(VISIBLE)["verdictText"].strip() == "CERTIFIED"
    assert browser.errors() == []
    img = _pixels(browser.screenshot())
    green = (np.abs(img.astype(int) - [0x1a, 0x7f, 0x37]).sum(axis=2) < 30).sum()
    assert green > 5000


def test_harness_detects_errors_and_broken_images(tmp_path, browser):
    """The checks above can fail: a console error, a broken image and a blank page are all caught."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><img class='cex-input' src='data:image/png;base64,AAAA'>"
                    "<script>console.error('boom')</script></body></html>")
    browser.open(page.as_uri())
    state = browser.evaluate(VISIBLE)
    assert any("boom" in e for e in browser.errors())
    assert state["images"] == 0 and state["brokenImages"] == 1 and not state["verdict"]
    img = _pixels(browser.screenshot())
    assert img.std() < 20  # blank
