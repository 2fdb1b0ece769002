"""The demo page in a real headless Chromium with the network cut off: it renders, predicts, explains,
shows the trials.

Needs Debian's browser and driver, which ./setup.sh installs (apt-get install -y chromium chromium-driver).
"""

from __future__ import annotations

import json
import shutil
from urllib.parse import urlparse

import pytest

from conftest import skip_if_setup_could_not_install

pytestmark = pytest.mark.slow  # a real browser against the served demo

PLOTS = ("parallel-coordinates", "learning-curves")  # the Experiment tab's images, by elem_id
PAGE_TIMEOUT_S = 90  # a loaded CI box can take a while to start the page's JavaScript
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,900",
    # No network but the app: every other host name fails to resolve, so a CDN font or script would be missed.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of the browser and its driver; session-scoped so a missing browser fails before the tuning run."""
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    for package, found in (("chromium", browser_path), ("chromium-driver", driver_path)):
        if not found:
            skip_if_setup_could_not_install(package)
    if not (browser_path and driver_path):
        pytest.fail(
            f"the browser test needs Chromium and its driver (found browser={browser_path}, driver={driver_path}); "
            "install them with: apt-get update && apt-get install -y chromium chromium-driver"
        )
    return browser_path, driver_path


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser_path, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, PAGE_TIMEOUT_S)
    wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#title textarea")))
    return wait


def image_width(driver, selector: str) -> int:
    """The natural width of a loaded image (0 while missing or loading, or if it failed to decode)."""
    script = "const img = document.querySelector(arguments[0]); return img && img.complete ? img.naturalWidth : 0;"
    return driver.execute_script(script, selector)


def first_row(driver) -> str:
    """The text of the trials table's first data row, as displayed (after any sorting in the page)."""
    script = """return Array.from(document.querySelectorAll('#trials-table [role=row]'))
        .filter(row => !row.closest('thead')).map(row => row.innerText).find(text => text.trim()) || '';"""
    return driver.execute_script(script)


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for since the last call, from Chrome's network log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.append(message["params"].get("request", {}).get("url") or message["params"].get("url", ""))
    return urls


def test_page_predicts_offline(browser, demo_url, served, tmp_path):
    from selenium.webdriver.common.by import By

    predictor, provenance = served.predictor, served.provenance
    title = "Counting seabirds in drone footage"
    wait = open_page(browser, demo_url)
    browser.find_element(By.CSS_SELECTOR, "#title textarea").send_keys(title)
    browser.find_element(By.ID, "predict-button").click()

    shown_tag = wait.until(
        lambda page: next(
            (
                e.text
                for e in page.find_elements(By.CSS_SELECTOR, "#prediction [data-testid='label-output-value']")
                if e.text
            ),
            None,
        )
    )
    tags = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#prediction .confidence-set dt")]
    percents = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#prediction .confidence-set dd")]
    browser.save_screenshot(str(tmp_path / "demo.png"))

    assert shown_tag == predictor.predict([title], [""])[0]["prediction"]
    assert sorted(tags) == sorted(predictor.classes)
    assert all(p.endswith("%") for p in percents), percents
    assert provenance.run_id in browser.find_element(By.ID, "provenance").text
    outside = [
        u
        for u in requested_urls(browser)
        if urlparse(u).scheme in ("http", "https", "ws", "wss")
        and urlparse(u).hostname not in ("127.0.0.1", "localhost")
    ]
    assert not outside, f"the page fetched from the network: {outside}"
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_empty_input_shows_a_message(browser, demo_url):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, demo_url)
    browser.find_element(By.ID, "predict-button").click()
    message = wait.until(
        lambda page: next(
            (e.text for e in page.find_elements(By.CSS_SELECTOR, "[data-testid='toast-text']") if e.text), None
        )
    )
    assert "Enter a title or a description" in message
    assert "Traceback" not in browser.page_source


def test_experiment_tab_shows_the_trials_and_plots(browser, demo_url, experiment, tmp_path):
    from selenium.webdriver.common.by import By

    wait = open_page(browser, demo_url)
    browser.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Experiment']").click()
    trial_ids = list(experiment.trials["trial_id"])
    table_text = wait.until(
        lambda page: next(
            (e.text for e in page.find_elements(By.ID, "trials-table") if all(t in e.text for t in trial_ids)), None
        )
    )
    assert "served" in table_text and "FINISHED" in table_text
    wait.until(lambda page: all(image_width(page, f"#{elem_id} img") for elem_id in PLOTS))
    widths = [image_width(browser, f"#{elem_id} img") for elem_id in PLOTS]
    browser.save_screenshot(str(tmp_path / "experiment.png"))
    assert all(width > 100 for width in widths), widths

    # Sortable: the best_val_loss header's menu puts the worst trial on top (the tab lists the best first).
    header = next(h for h in browser.find_elements(By.CSS_SELECTOR, "#trials-table th") if h.text == "best_val_loss")
    browser.execute_script("arguments[0].click()", header.find_element(By.CSS_SELECTOR, "button.cell-menu-button"))
    sort = wait.until(
        lambda page: next(
            (b for b in page.find_elements(By.XPATH, "//button[normalize-space()='Sort descending']")), None
        )
    )
    browser.execute_script("arguments[0].click()", sort)
    wait.until(lambda page: trial_ids[-1] in first_row(page) and trial_ids[0] not in first_row(page))
    assert "Traceback" not in browser.page_source
    assert (tmp_path / "experiment.png").stat().st_size > 10_000


def test_csv_scoring_shows_progress_and_offers_the_download(browser, demo_url, tmp_path):
    """A CSV of a few hundred rows: the page shows a progress bar with rows done/total while it is
    scored (recorded by an observer on the page, so a quick job is not missed), then the file."""
    import pandas as pd
    from selenium.webdriver.common.by import By

    from demo.app import EXAMPLES

    rows = 600
    upload = tmp_path / "projects.csv"
    pd.DataFrame(
        {
            "title": [EXAMPLES[i % 4][0] for i in range(rows)],
            "description": [EXAMPLES[i % 4][1] * 8 for i in range(rows)],
        }
    ).to_csv(upload, index=False)
    wait = open_page(browser, demo_url)
    browser.find_element(By.XPATH, "//button[contains(normalize-space(), 'Score a CSV file')]").click()
    browser.execute_script(
        """window.progressSeen = [];
        new MutationObserver(() => document.querySelectorAll('.progress-level-inner, .progress-text, .progress-bar')
            .forEach(e => window.progressSeen.push(e.className + '|' + e.textContent.trim())))
          .observe(document.body, {subtree: true, childList: true, characterData: true});"""
    )
    browser.find_element(By.CSS_SELECTOR, "#csv-upload input[type=file]").send_keys(str(upload))
    wait.until(lambda page: "projects" in page.find_element(By.ID, "csv-upload").text)
    browser.find_element(By.ID, "score-button").click()
    link = wait.until(
        lambda page: next(
            (
                a
                for a in page.find_elements(By.CSS_SELECTOR, "#csv-scored a")
                if (a.get_attribute("href") or "").endswith("projects-predictions.csv")
            ),
            None,
        )
    )
    seen = browser.execute_script("return window.progressSeen")
    browser.save_screenshot(str(tmp_path / "csv.png"))
    assert any(f"/{rows}" in text and "rows" in text for text in seen), seen[-20:]
    assert any("progress-bar" in text for text in seen), seen[-20:]
    assert "projects-predictions" in browser.find_element(By.ID, "csv-scored").text
    import urllib.request

    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:  # the download itself
        scored = pd.read_csv(response)
    assert len(scored) == rows and "prediction" in scored.columns
