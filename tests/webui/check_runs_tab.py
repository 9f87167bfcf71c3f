"""The Train page's Continue and Save now in a real WebUI's browser page (not run by CI: CI has no WebUI).

    python tests/webui/check_runs_tab.py --url http://127.0.0.1:7861 [--out <screenshots>]

Without a run to continue, Continue (with the saved settings, and with the page's) names the missing training
state, and Save now says no training is running; the start-from-LoRA field and the validation box are there.
Runs on a WebUI started with --ui-debug-mode (no model needed). Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import open_train_tools, set_name, show_page  # noqa: E402
from webui_api import check  # noqa: E402


def output_text(page, previous: str = "", timeout: float = 30) -> str:
    """The Train page's status once it shows something new."""
    deadline = time.time() + timeout
    text = previous
    while time.time() < deadline and text == previous:
        page.wait_for_timeout(500)
        text = page.locator("#train_tools_output").first.inner_text()
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    name = f"ttnothing{int(time.time()) % 100000}"
    with sync_playwright() as playwright:
        browser, page, errors = open_train_tools(playwright, args.url)
        show_page(page, "Train")
        set_name(page, name)
        check(page.locator("#train_tools_initial_lora textarea").count() == 1, "the start-from-LoRA field is there")
        check(page.locator("#train_tools_validation_loss input").is_checked(), "validation loss is on by default")
        page.locator("#train_tools_continue").click()
        text = output_text(page)
        check("There is no training state to continue from" in text and name in text,
              f"Continue without a saved run names the missing state ({text[:120]!r})")
        page.locator("#train_tools_continue_use_page input").check()
        page.locator("#train_tools_save_now").click()
        text = output_text(page, text)
        check("No training is running" in text, f"Save now without a training says so ({text[:120]!r})")
        page.locator("#train_tools_continue").click()
        text = output_text(page, text)
        check("There is no training state to continue from" in text, "Continue with the page's settings too")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out / "runs_tab.png"), full_page=True)
        check(not errors, f"no JavaScript errors ({errors[:2]})")
        browser.close()


if __name__ == "__main__":
    main()
