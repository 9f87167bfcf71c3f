"""Headless Chromium on a running WebUI with the Train Tools tab open, for the browser checks (not run by CI)."""

from __future__ import annotations

from playwright.sync_api import Browser, Page, Playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def open_train_tools(playwright: Playwright, url: str, height: int = 1300) -> tuple[Browser, Page, list[str]]:
    """The browser, its page showing the Train Tools tab, and the JavaScript errors the page raises from the start."""
    browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1500, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url, wait_until="networkidle")
    page.wait_for_timeout(4000)  # the WebUI's scripts finish setting up the page after the network is idle
    page.locator("#tabs > .tab-nav > button", has_text="Train Tools").click()
    page.wait_for_timeout(1000)
    return browser, page, errors


def show_page(page: Page, title: str) -> None:
    """Open one of the tab's pages (Dataset, Train, Preview grid)."""
    page.locator("#train_tools_pages > .tab-nav > button", has_text=title).click()
    page.wait_for_timeout(500)


def set_name(page: Page, name: str) -> None:
    """Type a LoRA name into the header's project list. Gradio 3 takes a typed value on key-up, which fill()
    does not send: a key press after it does, as a person's typing would (Enter would pick a listed project)."""
    field = page.locator("#train_tools_name input")
    field.click()
    field.fill(name)
    field.press("End")
    page.locator("#train_tools_trigger textarea").click()  # leave the field
    page.wait_for_timeout(500)


def project_options(page: Page) -> list[str]:
    """The projects the header's list offers (it opens the list, then closes it again)."""
    field = page.locator("#train_tools_name input")
    field.click()
    field.fill("")
    page.wait_for_timeout(300)
    options = [text.strip() for text in page.locator("#train_tools_name ul.options li").all_inner_texts()]
    page.keyboard.press("Escape")
    return options


def pick_project(page: Page, name: str) -> None:
    """Pick a listed project: type part of its name, then click it in the list (a key press opens the list)."""
    field = page.locator("#train_tools_name input")
    field.click()
    field.fill(name)
    field.press("End")
    page.locator("#train_tools_name ul.options li", has_text=name).first.click()
    page.wait_for_timeout(1000)
