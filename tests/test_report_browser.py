"""The rendered report in a real headless browser (Debian's chromium via selenium).

The page must load offline from file://, show Tables 1-5 and every figure with its image
actually decoded, and log no errors. A screenshot is kept: under pytest's tmp dir and as
results/test-artifacts/report.png.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reports.render import render_report
from test_figures import BACKBONE_MAP, FIGURE4, METHOD_MAP, synthetic_report_inputs

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACT = Path(__file__).resolve().parents[1] / "results/test-artifacts/report.png"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager then downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_report_in_browser(browser, tmp_path: Path) -> None:
    db, spaces = synthetic_report_inputs(tmp_path / "inputs")
    out = tmp_path / "report"
    render_report(db, out, BACKBONE_MAP, METHOD_MAP, FIGURE4, spaces)

    browser.get((out / "index.html").as_uri())
    assert browser.title == "UniKE benchmark report"
    assert browser.execute_script("return document.readyState") == "complete"

    for n in range(1, 6):
        rows = browser.execute_script(f"return document.querySelectorAll('#table{n} tbody tr').length")
        assert rows > 0, f"table {n} has no rows"
    # Our numbers are there, not only the paper's: Table 2's first cell carries our CI.
    assert "[" in browser.execute_script("return document.querySelector('#table2 tbody td.num').textContent")

    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
    assert sorted(src for src, _, _ in images) == [
        "figures/figure4.png", "figures/figure5a.png", "figures/gen-vs-loc.png"]
    for src, complete, width in images:
        assert complete and width > 0, f"{src} did not load"

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe

    # A full-page screenshot: grow the window to the page's height first.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(height, 16000))
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, ARTIFACT)
