"""The report page in a real headless browser (Debian's Chromium): the figures load, the trajectory
viewer renders its cards and filters from the address, no script fails; a screenshot is kept under
the test's output. Chromium is installed with apt-get when absent (root); otherwise skipped, saying why."""

import os
import re
import shutil
import subprocess

import pytest

from megarl.report import write_report
from tests.report.fabricate import fabricate_run

pytestmark = pytest.mark.browser


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and cannot be (needs root and apt-get): apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip(f"Chromium could not be installed: {proc.stderr.strip()[-300:]}")


def headless(chromium: str, profile, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--hide-scrollbars", *args], capture_output=True, text=True, timeout=180)


def rendered(chromium: str, profile, index: str, fragment: str = "") -> dict[str, str]:
    """The attributes the page sets on <html> once its scripts ran and its images loaded."""
    proc = headless(chromium, profile, "--virtual-time-budget=10000", "--dump-dom", f"file://{index}{fragment}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    html_tag = re.search(r"<html[^>]*>", proc.stdout)[0]
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', html_tag))
    shown = re.search(r'id="viewer-count"[^>]*data-shown="(\d+)"|data-shown="(\d+)"[^>]*id="viewer-count"', proc.stdout)
    attrs["shown"] = next(g for g in shown.groups() if g) if shown else ""
    return attrs


def test_the_page_renders_its_figures_and_viewer_without_script_errors(chromium, tmp_path):
    run = fabricate_run(str(tmp_path / "grpo"), "grpo", steps=20, samples_every=10)
    report = write_report([run])
    profile = tmp_path / "profile"
    page = rendered(chromium, profile, report.index)
    assert page["data-loaded"] == "1" and page["data-script-errors"] == "0", page
    assert page["data-figures"] == page["data-figures-loaded"] == str(len(report.figures)) == "7"
    assert page["data-viewer-cards"] == page["shown"] == "8"
    # filters from the address: by failure kind, by reward, by step
    assert rendered(chromium, profile, report.index, "#kind=tool_error")["shown"] == "2"
    assert rendered(chromium, profile, report.index, "#kind=any")["shown"] == "6"
    assert rendered(chromium, profile, report.index, "#min=0.5")["shown"] == "2"
    assert rendered(chromium, profile, report.index, "#kind=truncation&step=20")["shown"] == "1"
    shot = tmp_path / "report.png"
    proc = headless(chromium, profile, "--window-size=1400,3000", f"--screenshot={shot}", f"file://{report.index}")
    assert proc.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", proc.stderr[-2000:]
    assert shot.stat().st_size > 50_000   # a page, not a blank
    print(f"screenshot: {shot}")


def test_the_check_sees_a_script_error_and_a_broken_figure(chromium, tmp_path):
    """The attributes above can fail: a throwing script and an image that does not decode are counted."""
    run = fabricate_run(str(tmp_path / "grpo"), "grpo", steps=10)
    index = write_report([run]).index
    page = open(index).read()
    page = page.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    page = page.replace("</body>", "<script>notDefinedAnywhere();</script></body>")
    broken = tmp_path / "broken.html"
    broken.write_text(page)
    attrs = rendered(chromium, tmp_path / "profile", str(broken))
    assert int(attrs["data-script-errors"]) >= 2, attrs
    assert int(attrs["data-figures-loaded"]) == int(attrs["data-figures"]) - 1
