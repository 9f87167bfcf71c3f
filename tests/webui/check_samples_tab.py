"""Samples in the Train page's gallery, in headless Chromium on a running WebUI (not run by CI).

    python tests/webui/check_samples_tab.py --url http://127.0.0.1:7861 --pictures <folder>

Trains 1 epoch at 256 px (rank 4, a small rate: a random-weight SD1.5 survives it) with one sample prompt through
the tab, and checks: the sample is listed in the status and shown in the gallery, no page error. Exits non-zero
on the first failed check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import open_train_tools, set_name, show_page  # noqa: E402
from webui_api import check, request, wait_for_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--pictures", required=True)
    args = parser.parse_args()
    api = args.url.rstrip("/")

    with sync_playwright() as playwright:
        browser, page, errors = open_train_tools(playwright, api, height=1600)
        show_page(page, "Train")
        set_name(page, f"ttgal{int(time.time()) % 100000}")
        page.locator("#train_tools_trigger textarea").fill("ttgal")
        page.locator("#train_tools_train_dir textarea").fill(args.pictures)
        tab = page.locator("#tab_train_tools")
        for key, value in (("resolution", "256"), ("rank", "4"), ("alpha", "4"), ("unet_lr", "0.0001"),
                           ("text_encoder_lr", "0.00005"), ("epochs", "1")):
            tab.locator(f"#train_tools_{key} input[type=number]").fill(value)
        tab.locator("#train_tools_sample_settings .label-wrap").first.click()  # the accordion starts closed
        tab.locator("#train_tools_sample_every_n_epochs input[type=number]").fill("1")
        tab.locator("#train_tools_sample_prompts textarea").fill("ttgal, red disc --w 128 --h 128 --s 4 --d 5")
        tab.locator("#train_tools_advanced .label-wrap").first.click()
        tab.locator("#train_tools_enable_buckets input[type=checkbox]").uncheck()

        previous = request(api + "/train-tools/v1/status").get("id")
        page.locator("#train_tools_train").click()
        status = wait_for_job(api)
        while status.get("id") == previous:  # the click's job has not begun yet
            time.sleep(2)
            status = wait_for_job(api)
        check(status["state"] == "done" and len(status["samples"]) == 1,
              f"trained with a sample: {status['message']} {status['sample_error']}")
        page.wait_for_timeout(6000)  # the page's periodic refresh
        shown = page.locator("#train_tools_samples img").count()
        check(shown >= 1, f"the sample is shown in the Train page's gallery ({shown} pictures)")
        check(not errors, f"no page errors: {errors[:3]}")
        browser.close()
    print("all checks passed")


if __name__ == "__main__":
    main()
