"""The Train Tools tab in Chinese on a running WebUI: sets the WebUI's Localization through the API, reloads the UI,
saves screenshots of the three pages, and checks that Train Tools' words are Chinese; then the same with no
localization (English), and puts the options back as they were.

    python tests/webui/check_zh.py --url http://127.0.0.1:7861 --out <screenshot folder> [--localization zh_CN]

``--localization`` is the name of a Simplified Chinese localization file the WebUI lists (dtlnor's extension:
zh_CN; hanamizuki-ai's: "zh-Hans (Stable)"); one that is not installed still makes Train Tools Chinese (it reads
the name), only the WebUI's own words then stay English. Checks, in Chinese: every label, placeholder, info and
button text of the tab's components in the built UI (gradio's /config) is Chinese or a name kept as is
(``KEPT``); the tab titles, buttons and a run-time error are the catalogue's Chinese; when the localization
file has entries, the WebUI's own tabs are translated too (both at once: theirs by JavaScript, ours in Python).
In English: no Chinese anywhere in the tab. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import CHROMIUM_ARGS, show_page  # noqa: E402

CATALOGUE = Path(__file__).resolve().parents[2] / "lib_train" / "common" / "strings_zh.json"
CJK = re.compile(r"[\u4e00-\u9fff]")
KEPT = {"Alpha", "🔄"}  # names, not words: the same in both languages


def request(url: str, payload: dict | None = None):
    """JSON over HTTP (webui_api's helpers need numpy, which the browser venv has not)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as response:
        return json.loads(response.read() or b"null")


def check(condition: bool, message: str) -> None:
    print(("ok   " if condition else "FAIL ") + message, flush=True)
    if not condition:
        sys.exit(1)


def built_texts(url: str) -> list[tuple[str, str, str]]:
    """(elem_id, property, text) of every Train Tools component in the UI the server built (gradio's config)."""
    config = request(url + "/config")
    found = []
    for component in config["components"]:
        props = component.get("props", {})
        elem_id = props.get("elem_id") or ""
        if not str(elem_id).startswith("train_tools"):
            continue
        for key in ("label", "placeholder", "info", "title"):
            if props.get(key):
                found.append((elem_id, key, str(props[key])))
        if component.get("type") == "button" and props.get("value"):
            found.append((elem_id, "value", str(props["value"])))
    return found


def train_button(url: str) -> str | None:
    """The Train button's text in the UI the server now serves; None while the server rebuilds it."""
    try:
        return next((text for elem_id, key, text in built_texts(url) if elem_id == "train_tools_train"), None)
    except (OSError, ValueError):  # the old UI is closed and the new one not up yet
        return None


def reload_ui(page: Page, url: str, localization: str, train_label: str) -> None:
    """Set the Localization (Train Tools' own Language setting on Auto) and rebuild the UI as "Reload UI" does,
    until the server's UI has the Train button reading ``train_label``."""
    request(url + "/sdapi/v1/options", {"localization": localization, "train_tools_language": "Auto"})
    page.goto(url, wait_until="networkidle")
    page.wait_for_timeout(3000)
    page.evaluate("document.querySelector('#settings_restart_gradio').click()")  # the Settings page's Reload UI
    time.sleep(10)  # the WebUI takes the request within 5 s and closes the old UI before building the new one
    deadline = time.time() + 600
    while train_button(url) != train_label:
        check(time.time() < deadline, f"the UI rebuilt with Localization {localization!r} within 10 minutes")
        time.sleep(3)
    page.goto(url, wait_until="networkidle")
    page.wait_for_timeout(4000)
    page.locator("#tabs > .tab-nav > button", has_text="Train Tools").click()
    page.wait_for_timeout(1000)


def screenshots(page: Page, out: Path, prefix: str, titles: list[str]) -> None:
    for title, file in zip(titles, ("dataset", "train", "grid")):
        show_page(page, title)
        page.screenshot(path=str(out / f"{prefix}-{file}.png"), full_page=True)


def check_chinese(page: Page, url: str, zh: dict[str, str], out: Path) -> None:
    texts = built_texts(url)
    english = [t for t in texts if not CJK.search(t[2]) and t[2] not in KEPT]
    check(len(texts) > 100 and not english, f"{len(texts)} texts of the built tab are Chinese; not: {english[:5]}")
    titles = [zh["Dataset"], zh["Train"], zh["Preview grid"]]
    tabs = page.locator("#train_tools_pages > .tab-nav > button").all_inner_texts()
    check([t.strip() for t in tabs] == titles, f"page titles: {tabs}")
    screenshots(page, out, "zh", titles)
    buttons = (("train_tools_train", "Train"), ("train_tools_ds_import", "Import"),
               ("train_tools_grid_render", "Render grid"), ("train_tools_preset_apply", "Apply preset"))
    for elem_id, english_text in buttons:
        shown = page.locator(f"#{elem_id}").inner_text().strip()
        check(shown == zh[english_text], f"#{elem_id} reads {shown!r}")
    show_page(page, zh["Train"])
    page.locator("#train_tools_name input").fill("")
    page.locator("#train_tools_train").click()  # no name: refused with the catalogue's message
    page.wait_for_timeout(3000)  # the click's "processing" first, then the refusal
    for _ in range(60):
        refused = page.locator("#train_tools_output").first.inner_text().strip()
        if CJK.search(refused) and "processing" not in refused:
            break
        page.wait_for_timeout(1000)
    check(CJK.search(refused) is not None, f"a run-time error in Chinese: {refused!r}")
    page.screenshot(path=str(out / "zh-train-error.png"), full_page=True)
    entries = page.evaluate("Object.keys(window.localization || {}).length")
    if entries:
        webui_tabs = page.locator("#tabs > .tab-nav > button").all_inner_texts()
        check(any(CJK.search(t) for t in webui_tabs), f"the localization's {entries} entries translate the WebUI "
                                                       f"too: {webui_tabs[:4]}")
    else:
        print("note: the localization file has no entries here; only Train Tools' words are Chinese")


def check_english(page: Page, url: str, out: Path) -> None:
    texts = built_texts(url)
    chinese = [t for t in texts if CJK.search(t[2])]
    check(len(texts) > 100 and not chinese, f"no localization: {len(texts)} texts, none Chinese ({chinese[:3]})")
    screenshots(page, out, "en", ["Dataset", "Train", "Preview grid"])
    check(not CJK.search(page.locator("#tab_train_tools").inner_text()), "no Chinese in the tab")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--localization", default="zh_CN")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    zh = json.loads(CATALOGUE.read_text(encoding="utf-8"))
    before = request(args.url + "/sdapi/v1/options")
    kept = {key: before.get(key) for key in ("localization", "train_tools_language") if key in before}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        try:
            reload_ui(page, args.url, args.localization, zh["Train"])
            check_chinese(page, args.url, zh, args.out)
            reload_ui(page, args.url, "None", "Train")
            check_english(page, args.url, args.out)
        finally:
            request(args.url + "/sdapi/v1/options", kept or {"localization": "None"})
            browser.close()
    print("all checks passed; put the localization back, then Reload UI, if it was not None")


if __name__ == "__main__":
    main()
