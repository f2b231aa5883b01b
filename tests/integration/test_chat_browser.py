"""`vlm chat` in a real headless Chromium: upload an image, ask, ask again; the page must show
`vlm predict`'s answers. A screenshot is kept at artifacts/serve/chat_browser.png.

Chromium and its driver come from Debian (`make test` installs them); without them this test fails
and says so, rather than skipping.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from captions import PROJECTOR, write_questions_file
from serving import predictions

SCREENSHOT = Path(__file__).resolve().parents[2] / "artifacts" / "serve" / "chat_browser.png"


@pytest.fixture(scope="module")
def model_dir(train_captioner):
    return train_captioner(PROJECTOR) / "final"


@pytest.fixture(scope="module")
def chat_url(model_dir):
    """`vlm chat` as a person starts it, on a free port; the URL it prints."""
    process = subprocess.Popen(
        [sys.executable, "-m", "vlm.cli", "chat", "--model", str(model_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=180)
            seen.append(line)
            if line.startswith("Chat page: "):
                yield line.removeprefix("Chat page: ").strip()
                break
    except queue.Empty:
        pytest.fail(f"`vlm chat` printed no page URL within 180 s: {''.join(seen)}")
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture()
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("Chromium or chromedriver is not installed: `make test` installs them (apt-get install chromium "
                    "chromium-driver, as root); install them to run the browser test.")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _ask(driver, text: str, image: Path | None = None) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    done = len(driver.find_elements(By.CSS_SELECTOR, ".msg[data-done]"))
    if image is not None:
        driver.find_element(By.ID, "image").send_keys(str(image))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "preview").get_attribute("data-count") == "1")
    driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg[data-done]")) > done)
    answer = driver.find_elements(By.CSS_SELECTOR, ".msg[data-done]")[-1]
    assert "error" not in answer.get_attribute("class"), answer.text
    return answer.find_element(By.CSS_SELECTOR, ".text").text


def test_chat_page_shows_vlm_predicts_answers(browser, chat_url, model_dir, captions_file, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = predictions(model_dir, write_questions_file(captions_file, tmp_path / "q.json"), tmp_path / "p.jsonl")
    browser.get(chat_url)
    WebDriverWait(browser, 30).until(lambda d: "fusion: projector" in d.find_element(By.ID, "model").text)
    assert "vision: vit" in browser.find_element(By.ID, "model").text

    image = captions_file.parent / "1.png"
    caption = _ask(browser, "Describe the image.", image)
    assert caption == expected["c1-caption"]

    # The second turn sees the image and the page's own first answer: predict gets the same conversation.
    record = json.loads(captions_file.read_text())[1]
    record["image"] = str(image)
    record["conversations"][1]["value"] = caption
    (tmp_path / "turn2.json").write_text(json.dumps([record]))
    second = predictions(model_dir, tmp_path / "turn2.json", tmp_path / "turn2.jsonl")
    assert _ask(browser, "What colour is the shape?") == second["c1"]
    assert second["c1"] != expected["c1-caption"]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
