"""Drives the Train Tools tab of a running WebUI in headless Chromium and saves screenshots.

    python tests/webui/check_tab.py --url http://127.0.0.1:7861 --pictures <folder> --out <screenshot folder>

Needs Playwright (python) and Debian's chromium. Checks: the tab is there with the loaded base model
shown; a 1-epoch training started with the Train button shows the WebUI progress bar and step text while
it runs, then the status, the loss plot and the saved files; after a reload the new LoRA is in the name's
project list, and picking it brings back its trigger words. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import open_train_tools, pick_project, project_options, set_name, show_page  # noqa: E402
from webui_api import check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--pictures", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"tttab{int(time.time()) % 100000}"

    with sync_playwright() as playwright:
        browser, page, _ = open_train_tools(playwright, args.url, height=1300)
        show_page(page, "Train")
        base = page.locator("#train_tools_base_model textarea").input_value()
        check(".safetensors" in base or "[" in base, f"base model shown: {base!r}")

        set_name(page, name)
        page.locator("#train_tools_trigger textarea").fill("ttlive")
        page.locator("#train_tools_train_dir textarea").fill(args.pictures)
        tab = page.locator("#tab_train_tools")
        for key, value in (("epochs", "1"), ("resolution", "256"), ("unet_lr", "0.0004"), ("text_encoder_lr", "0.0002")):
            tab.locator(f"#train_tools_{key} input[type=number]").fill(value)
        tab.locator("#train_tools_advanced .label-wrap").first.click()  # the Advanced accordion starts closed
        tab.locator("#train_tools_enable_buckets input[type=checkbox]").uncheck()
        page.screenshot(path=str(args.out / "tab-filled.png"), full_page=True)
        page.locator("#train_tools_train").click()

        page.wait_for_selector("#tab_train_tools .progressDiv", timeout=60000)
        page.wait_for_function("document.querySelector('#train_tools_progress').innerText.includes('Epoch')",
                               timeout=600000)
        page.screenshot(path=str(args.out / "tab-training.png"), full_page=True)
        check(True, "the WebUI progress bar and the step text appear while training")

        page.wait_for_function("/(done|failed|stopped):/.test(document.querySelector('#train_tools_output').innerText)",
                               timeout=900000)
        output = page.locator("#train_tools_output").first.inner_text()
        check("done:" in output, f"training done: {output.strip()[:200]!r}")
        page.wait_for_timeout(5000)
        page.screenshot(path=str(args.out / "tab-done.png"), full_page=True)
        files = page.locator("#train_tools_files").first.inner_text()
        check(f"{name}.safetensors" in files, f"saved file listed: {files.strip()[:200]}")
        check("unchanged" in page.locator("#train_tools_output").first.inner_text(), "restore verified in the tab")

        page.reload(wait_until="networkidle")
        page.wait_for_timeout(4000)
        page.locator("#tabs > .tab-nav > button", has_text="Train Tools").click()
        options = project_options(page)
        check(options[:1] == [name], f"the new LoRA leads the project list: {options[:5]}")
        pick_project(page, name)
        trigger = page.locator("#train_tools_trigger textarea").input_value()
        page.screenshot(path=str(args.out / "tab-project-picked.png"), full_page=True)
        check(trigger == "ttlive", f"picking the project brings back its trigger words: {trigger!r}")
        browser.close()
    print("all checks passed")


if __name__ == "__main__":
    main()
