"""Drives the Train page's "Find learning rate" button in headless Chromium on a running WebUI (not run by CI).

    python tests/webui/check_find_lr_button.py --url http://127.0.0.1:7861 --pictures <folder> --out <folder> \
        [--steps 20]

Needs Playwright (python) and Debian's chromium, and the optimizer packages (install.py). Chooses Prodigy,
clicks the button and checks: the WebUI's progress bar while it runs, the UNet and text-encoder learning-rate fields filled with the job's rates (2 significant digits, as the API
status gives them), the optimizer switched to AdamW (an adaptive optimizer would read the rates as multipliers),
and no page error. Saves screenshots. Exits non-zero on the first failed check.
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
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"ttlrb{int(time.time()) % 100000}"

    with sync_playwright() as playwright:
        browser, page, errors = open_train_tools(playwright, args.url, height=1500)
        show_page(page, "Train")
        set_name(page, name)
        page.locator("#train_tools_trigger textarea").fill("ttlr")
        page.locator("#train_tools_train_dir textarea").fill(args.pictures)
        tab = page.locator("#tab_train_tools")
        # The API check's settings: a random-weight SD1.5 goes to NaN under the probe at larger ranks.
        for key, value in (("resolution", "256"), ("rank", "4"), ("alpha", "4"), ("text_encoder_lr", "0.00005")):
            tab.locator(f"#train_tools_{key} input[type=number]").fill(value)
        tab.locator("#train_tools_advanced .label-wrap").first.click()  # the Advanced accordion starts closed
        tab.locator("#train_tools_enable_buckets input[type=checkbox]").uncheck()
        tab.locator("#train_tools_lr_finder_steps input[type=number]").fill(str(args.steps))
        optimizer = tab.locator("#train_tools_optimizer input")
        optimizer.click()
        page.locator("#train_tools_optimizer ul.options li", has_text="Prodigy").first.click()
        page.wait_for_timeout(500)
        page.screenshot(path=str(args.out / "find-lr-filled.png"), full_page=True)

        api = args.url.rstrip("/")
        previous = request(api + "/train-tools/v1/status").get("id")
        page.locator("#train_tools_find_lr").click()
        page.wait_for_selector("#tab_train_tools .progressDiv", timeout=60000)
        check(True, "the WebUI progress bar appears while the finder runs")
        status = wait_for_job(api)  # the page shows the previous job's status until the new one ends
        while status.get("id") == previous:
            time.sleep(2)
            status = wait_for_job(api)
        check(status["kind"] == "find-lr", f"the button started a learning-rate search ({status['id']})")
        page.wait_for_function("/(done|failed|stopped):/.test(document.querySelector('#train_tools_output').innerText)"
                               " && !/running/.test(document.querySelector('#train_tools_output').innerText)",
                               timeout=120000)
        output = page.locator("#train_tools_output").first.inner_text()
        check("done:" in output, f"the finder is done: {output.strip()[:200]!r}")
        page.wait_for_timeout(3000)
        page.screenshot(path=str(args.out / "find-lr-done.png"), full_page=True)

        rates = status["learning_rates"]
        shown = {part: float(tab.locator(f"#train_tools_{part}_lr input[type=number]").input_value())
                 for part in ("unet", "text_encoder")}
        check(set(rates) <= set(shown) and "unet" in rates, f"rates found: {rates}")
        check(all(shown[part] == float(f"{rate:.2g}") for part, rate in rates.items()),
              f"the learning-rate fields hold them: {shown}")
        chosen = optimizer.input_value()
        check(chosen == "AdamW", f"the optimizer switched from Prodigy to AdamW: {chosen!r}")
        check(not errors, f"no page errors: {errors[:3]}")
        browser.close()
    print("all checks passed")


if __name__ == "__main__":
    main()
