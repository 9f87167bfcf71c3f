"""The Train page follows the loaded model's family, in headless Chromium on a running WebUI (not run by CI).

    python tests/webui/check_family_switch.py --url http://127.0.0.1:7861 --sd1 random-sd15 --sdxl tiny-sdxl \
        --out <screenshot folder>

Starts on the SD1 checkpoint, types one value of its own, switches the WebUI to the SDXL checkpoint (as its
checkpoint dropdown does, through the options API) and opens the Train page again: the settings still at the SD1
defaults take SDXL's (resolution 1024, buckets up to 2048, UNet only, gradient checkpointing), the typed value
stays, the base model shown is the SDXL file; switching back brings the SD1 defaults back. Exits non-zero on the
first failed check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import open_train_tools, show_page  # noqa: E402
from webui_api import check, request  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--sd1", required=True, help="part of the SD1 checkpoint's name")
    parser.add_argument("--sdxl", required=True, help="part of the SDXL checkpoint's name")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    api = args.url.rstrip("/")
    titles = [model["title"] for model in request(api + "/sdapi/v1/sd-models")]
    sd1, sdxl = (next(t for t in titles if part in t) for part in (args.sd1, args.sdxl))
    request(api + "/sdapi/v1/options", {"sd_model_checkpoint": sd1})

    with sync_playwright() as playwright:
        browser, page, errors = open_train_tools(playwright, args.url, height=1500)
        tab = page.locator("#tab_train_tools")

        def number(key: str) -> float:
            return float(tab.locator(f"#train_tools_{key} input[type=number]").input_value())

        def settings() -> dict:
            return {"resolution": number("resolution"), "min_bucket_reso": number("min_bucket_reso"),
                    "max_bucket_reso": number("max_bucket_reso"), "text_encoder_lr": number("text_encoder_lr"),
                    "gradient_checkpointing": tab.locator("#train_tools_gradient_checkpointing input").is_checked(),
                    "base_model": page.locator("#train_tools_base_model textarea").input_value()}

        def reopen_train_page() -> dict:
            show_page(page, "Dataset")
            show_page(page, "Train")
            page.wait_for_timeout(2000)
            return settings()

        show_page(page, "Train")
        tab.locator("#train_tools_advanced .label-wrap").first.click()  # the Advanced accordion starts closed
        on_sd1 = settings()
        check(on_sd1["resolution"] == 512 and on_sd1["text_encoder_lr"] > 0 and args.sd1 in on_sd1["base_model"],
              f"SD1 defaults on the SD1 checkpoint: {on_sd1}")
        typed = tab.locator("#train_tools_min_bucket_reso input[type=number]")
        typed.fill("384")
        typed.press("Tab")
        page.screenshot(path=str(args.out / "family-sd1.png"), full_page=True)

        request(api + "/sdapi/v1/options", {"sd_model_checkpoint": sdxl})
        on_sdxl = reopen_train_page()
        page.screenshot(path=str(args.out / "family-sdxl.png"), full_page=True)
        check(on_sdxl["resolution"] == 1024 and on_sdxl["max_bucket_reso"] == 2048 and on_sdxl["text_encoder_lr"] == 0
              and on_sdxl["gradient_checkpointing"] is True, f"SDXL defaults after the switch: {on_sdxl}")
        check(on_sdxl["min_bucket_reso"] == 384, "the value typed by the user stays")
        check(args.sdxl in on_sdxl["base_model"], f"the base model shown is the SDXL file: {on_sdxl['base_model']!r}")

        request(api + "/sdapi/v1/options", {"sd_model_checkpoint": sd1})
        back = reopen_train_page()
        check(back["resolution"] == 512 and back["max_bucket_reso"] == on_sd1["max_bucket_reso"]
              and back["text_encoder_lr"] == on_sd1["text_encoder_lr"] and back["min_bucket_reso"] == 384,
              f"SD1 defaults back after switching back, the typed value kept: {back}")
        check(not errors, f"no page errors: {errors[:3]}")
        browser.close()
    print("all checks passed")


if __name__ == "__main__":
    main()
