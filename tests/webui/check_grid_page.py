"""Drives the Preview grid page of a running WebUI in headless Chromium and saves screenshots.

    python tests/webui/check_grid_page.py --url http://127.0.0.1:7861 --name <a LoRA trained by Train Tools> \
        --out <screenshot folder>

Checks: Check base model says the LoRA was trained on the loaded checkpoint; Render grid shows the WebUI's
progress bar, then the labelled grid; a click on a cell shows that cell and its epoch and weight; "Use this
epoch at this weight" reports the new final file. Exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import open_train_tools, set_name, show_page  # noqa: E402
from webui_api import check  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser, page, _ = open_train_tools(playwright, args.url, height=1400)
        show_page(page, "Preview grid")
        set_name(page, args.name)
        page.locator("#train_tools_trigger textarea").fill(args.name)
        page.locator("#train_tools_grid_check").click()
        page.wait_for_function("document.querySelector('#train_tools_grid_status').innerText.includes('trained on')",
                               timeout=30000)
        status = page.locator("#train_tools_grid_status").last.inner_text()
        check("trained on the loaded checkpoint" in status, f"base model check: {status.strip()!r}")

        page.locator("#train_tools_grid_fill").click()
        page.wait_for_function(f"document.querySelector('#train_tools_grid_prompt textarea').value.startsWith('{args.name}')",
                               timeout=30000)
        prompt = page.locator("#train_tools_grid_prompt textarea").input_value()
        check(len(prompt) > len(args.name), f"prompt filled from the training captions: {prompt!r}")
        for key, value in (("steps", "4"), ("width", "128"), ("height", "128")):
            page.locator(f"#train_tools_grid_{key} input[type=number]").fill(value)
            page.locator(f"#train_tools_grid_{key} input[type=number]").press("Enter")
        page.locator("#train_tools_grid_weights textarea").fill("0.5, 1")
        page.locator("#train_tools_grid_sampler input").fill("Euler")
        page.locator("#train_tools_grid_sampler input").press("Enter")
        page.screenshot(path=str(args.out / "grid-filled.png"), full_page=True)

        page.locator("#train_tools_grid_render").click()
        page.wait_for_selector("#tab_train_tools .progressDiv", timeout=60000)
        check(True, "the WebUI's progress bar shows while the grid renders")
        page.screenshot(path=str(args.out / "grid-progress.png"), full_page=True)
        page.wait_for_selector("#train_tools_grid_image img", timeout=900000)
        page.wait_for_timeout(1000)
        status = page.locator("#train_tools_grid_status").last.inner_text()
        check("Preview grid:" in status and "unchanged" in status, f"grid done: {status.strip()!r}")

        grid = page.locator("#train_tools_grid_image img")
        box = grid.bounding_box()
        # The right column, first row: a cell (the labels are on the left and the top).
        grid.click(position={"x": box["width"] * 0.8, "y": box["height"] * 0.45})
        page.wait_for_function("document.querySelector('#train_tools_grid_picked').innerText.includes('weight')",
                               timeout=30000)
        picked = page.locator("#train_tools_grid_picked").last.inner_text()
        check("at weight 1" in picked, f"clicked cell: {picked.strip()!r}")
        page.locator("#train_tools_grid_use").click()
        page.wait_for_function("document.querySelector('#train_tools_grid_choice').innerText.length > 0", timeout=30000)
        choice = page.locator("#train_tools_grid_choice").last.inner_text()
        check(f"{args.name}.safetensors is now" in choice, f"chosen: {choice.strip()!r}")
        page.screenshot(path=str(args.out / "grid-chosen.png"), full_page=True)
        browser.close()
    print("all checks passed")


if __name__ == "__main__":
    main()
