"""Drives the Dataset page of the Train Tools tab in a running WebUI (headless Chromium); saves screenshots.

    python tests/webui/check_dataset_page.py --url http://127.0.0.1:7861 \
        --out <screenshot folder> [--projects-dir <webui>/train_tools] \
        [--tiny-tagger <webui>/models/TrainTools-taggers/<folder written by tests/tiny_wd14.py>]

Needs Playwright (python) and Debian's chromium; the WebUI must be offline-capable as in
../shared/docs/webui-harness.md. It makes its own pictures (captioned and not, a transparent one, a truncated
file, a near-duplicate, a GBK caption), uploads them through the page and checks what the page shows and what
is on disk: the import report, the Train page's folder, the health check, the tag editor (remove, undo,
duplicates, add, per-image edit, bind features to the trigger), a click-to-focus crop, a tagging run with
--tiny-tagger, and that the taggers that cannot download their models offline say so. Exits non-zero on the
first failed check.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance
from playwright.sync_api import Page, sync_playwright

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2])]
from browser import open_train_tools, set_name  # noqa: E402
from lib_train.dataset.captions import split_tags  # noqa: E402
from lib_train.dataset.training_data import load_rgb  # noqa: E402
from lib_train.tagging.wd14 import MODELS_SUBFOLDER, WD14Tagger  # noqa: E402
from lib_train.tagging.auto_tag import TagOptions, merge_tags  # noqa: E402
from webui_api import check  # noqa: E402

TRIGGER = "ttchar"
LONG = 120_000  # ms; the CPU machine is shared and slow


# -- pictures ----------------------------------------------------------------------------------------

def _scene(seed: int, size: tuple[int, int]) -> Image.Image:
    """A picture with large shapes, so that perceptual hashes tell pictures apart."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        w, h = rng.randrange(40, size[0] // 2), rng.randrange(40, size[1] // 2)
        draw.ellipse((x - w, y - h, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def make_pictures(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def caption(stem: str, text: str, encoding: str = "utf-8") -> None:
        files[f"{stem}.txt"] = folder / f"{stem}.txt"
        files[f"{stem}.txt"].write_bytes(text.encode(encoding))

    def picture(name: str, image: Image.Image, **save) -> None:
        files[name] = folder / name
        image.save(files[name], **save)

    picture("alpha.png", _scene(1, (640, 768)))
    caption("alpha", f"{TRIGGER}, 1girl, blue eyes, long hair, smile, red dress")
    picture("bravo.jpg", _scene(2, (768, 640)), quality=92)
    caption("bravo", "1girl, blue eyes, long hair, smile, outdoors, smile")
    transparent = _scene(3, (600, 600)).convert("RGBA")
    transparent.putalpha(0)  # fully transparent but for the disc drawn next
    ImageDraw.Draw(transparent).ellipse((100, 100, 500, 500), fill=(20, 40, 200, 255))
    picture("charlie.png", transparent)
    caption("charlie", "1girl, blue eyes, long hair, sitting, hat (object)")
    near = ImageEnhance.Brightness(_scene(1, (640, 768)).resize((560, 672))).enhance(1.06)
    picture("delta_copy.png", near)
    caption("delta_copy", "1girl, blue eyes, short hair, smile")
    picture("echo.png", _scene(5, (512, 512)))
    caption("echo", "1girl, 蓝色眼睛, 长发", encoding="gbk")
    picture("foxtrot.webp", _scene(6, (700, 500)), quality=90)  # no caption
    whole = folder / "whole.png"
    _scene(7, (512, 512)).save(whole)
    files["broken.png"] = folder / "broken.png"
    files["broken.png"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    return files


# -- page helpers -------------------------------------------------------------------------------------

def wait_text(page: Page, selector: str, text: str, timeout: int = LONG) -> str:
    page.wait_for_function("([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
                           arg=[selector, text], timeout=timeout)
    return page.locator(selector).first.inner_text()


def fill(page: Page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input[type=number]").first.fill(value)


def click(page: Page, elem_id: str) -> None:
    page.locator(f"#{elem_id}").click()


def choose(page: Page, elem_id: str, option: str) -> None:
    """Pick an option of a gradio 3 dropdown by its text."""
    field = page.locator(f"#{elem_id} input")
    field.click()
    field.fill(option)
    page.locator(f"#{elem_id} ul.options li", has_text=option).first.click()
    page.wait_for_timeout(300)


def table_rows(page: Page, elem_id: str) -> list[list[str]]:
    rows = page.locator(f"#{elem_id} tbody tr")
    return [[cell.strip() for cell in rows.nth(i).locator("td").all_inner_texts()] for i in range(rows.count())]


def caption_of(pictures: Path, stem: str) -> str:
    return (pictures / f"{stem}.txt").read_text(encoding="utf-8").strip()


def all_captions(pictures: Path) -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8").strip() for p in sorted(pictures.glob("*.txt"))}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the checks ---------------------------------------------------------------------------------------

def check_import(page: Page, files: dict[str, Path], name: str, projects_dir: Path | None, out: Path) -> Path:
    """Returns the project's pictures folder: under --projects-dir, else where the page says it is."""
    # Import before the upload finished would send empty files (gradio 3 sends what it has).
    with page.expect_response(lambda r: r.url.endswith("/upload") and r.request.method == "POST", timeout=LONG):
        page.locator("#train_tools_ds_uploads input[type=file]").set_input_files([str(p) for p in files.values()])
    page.wait_for_timeout(1000)
    click(page, "train_tools_ds_import")
    report = wait_text(page, "#train_tools_ds_import_report", "imported")
    page.screenshot(path=str(out / "dataset-1-import.png"), full_page=True)
    train_dir = Path(page.locator("#train_tools_train_dir textarea").input_value())
    pictures = projects_dir / name / "pictures" if projects_dir else train_dir
    check(train_dir == pictures and pictures.parts[-2:] == (name, "pictures"),
          f"the Train page's training folder is the project's pictures folder: {train_dir}")
    project = pictures.parent
    check("6 imported" in report, f"import summary: {report.splitlines()[0]!r}")
    failed = [row for row in table_rows(page, "train_tools_ds_import_report") if row and row[0] == "failed"]
    check(any(row[1] == "broken.png" and "truncated" in row[2] for row in failed), "the truncated file is a failed row")
    check(any(row[1] == "echo.txt" and "GB" in row[2] for row in failed),
          "the GBK caption is reported as not UTF-8, naming the file and its likely encoding")
    check(sorted(p.stem for p in pictures.glob("*.png")) == ["alpha", "bravo", "charlie", "delta_copy", "echo", "foxtrot"],
          "pictures/ holds the six readable pictures as PNG")
    check(not (pictures / "echo.txt").exists() and not (pictures / "foxtrot.txt").exists(),
          "no caption was written for the refused GBK caption nor for the uncaptioned picture")
    check(caption_of(pictures, "charlie") == "1girl, blue eyes, long hair, sitting, hat (object)", "captions came along")
    originals = {p.name: p for p in (project / "originals").rglob("*") if p.is_file()}
    same = all(name in originals and sha(originals[name]) == sha(path)
               for name, path in files.items() if name != "broken.png")
    check(same, "originals/ holds byte-identical copies of the uploads")
    with Image.open(pictures / "charlie.png") as charlie:
        check(charlie.mode == "RGB" and charlie.getpixel((5, 5)) == (255, 255, 255),
              "the transparent picture is RGB on the white background")
    check(page.locator("#train_tools_ds_uploads", has_text="alpha.png").count() == 0,
          "the upload list is emptied, so a second Import does not copy the same files again")
    return pictures


def check_folder_import(page: Page, folder: Path, pictures: Path, out: Path) -> None:
    """A server folder holding a picture with its caption and a zip with another pair."""
    folder.mkdir(parents=True, exist_ok=True)
    _scene(8, (512, 640)).save(folder / "golf.png")
    (folder / "golf.txt").write_text("1girl, golf", encoding="utf-8")
    _scene(9, (640, 512)).save(folder / "hotel.png")
    with zipfile.ZipFile(folder / "more.zip", "w") as archive:
        archive.write(folder / "hotel.png", "inner/hotel.png")
        archive.writestr("inner/hotel.txt", "1girl, hotel")
    (folder / "hotel.png").unlink()
    fill(page, "train_tools_ds_folder", str(folder))
    click(page, "train_tools_ds_import")
    report = wait_text(page, "#train_tools_ds_import_report", "2 imported")
    page.locator("#train_tools_ds_import_report").first.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "dataset-9-folder-import.png"), full_page=False)
    check("failed" not in report and caption_of(pictures, "golf") == "1girl, golf"
          and caption_of(pictures, "hotel") == "1girl, hotel", f"server folder with a zip imported: {report.splitlines()[0]!r}")


def check_health(page: Page, out: Path) -> None:
    click(page, "train_tools_ds_health_check")
    summary = wait_text(page, "#train_tools_ds_health_summary", "per epoch")
    page.wait_for_timeout(500)
    rows = table_rows(page, "train_tools_ds_health_findings")
    page.locator("#train_tools_ds_health_summary").first.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "dataset-2-health.png"), full_page=True)
    check("6 readable image(s)" in summary, f"health summary: {summary.strip()[:160]!r}")
    findings = [" | ".join(row) for row in rows]
    check(any("near" in f.lower() and "delta_copy" in f and "alpha" in f for f in findings),
          "the near-duplicate pair is found")
    check(any("foxtrot" in f and "caption" in f.lower() for f in findings), "the missing caption is found")


def check_tag_editor(page: Page, pictures: Path, out: Path) -> None:
    click(page, "train_tools_ds_refresh")
    wait_text(page, "#train_tools_ds_tag_table", "blue eyes")
    rows = table_rows(page, "train_tools_ds_tag_table")
    counts = {row[0]: row[1] for row in rows if len(row) >= 2}
    check(counts.get("blue eyes") == "4" and counts.get("smile") == "3", f"tag frequency table: {counts}")

    smile_row = next(i for i, row in enumerate(rows) if row[0] == "smile")
    page.locator("#train_tools_ds_tag_table tbody tr").nth(smile_row).locator("td").nth(1).click()
    page.wait_for_function("document.querySelector('#train_tools_ds_tag textarea').value === 'smile'", timeout=LONG)
    check(True, "clicking a row of the table picks its tag")
    before = all_captions(pictures)
    click(page, "train_tools_ds_remove")
    message = wait_text(page, "#train_tools_ds_tag_message", "Removed 'smile'")
    check("3 caption(s) changed" in message, f"remove shows what changed: {message.strip()!r}")
    check(not any("smile" in text for text in all_captions(pictures).values()), "smile is gone from every caption on disk")
    undo_label = page.locator("#train_tools_ds_undo").inner_text()
    check("Removed 'smile'" in undo_label, f"the undo button says what it reverts: {undo_label!r}")
    click(page, "train_tools_ds_undo")
    wait_text(page, "#train_tools_ds_tag_message", "Undid")
    check(all_captions(pictures) == before, "undo restores the captions on disk exactly")

    click(page, "train_tools_ds_dedupe")
    message = wait_text(page, "#train_tools_ds_tag_message", "duplicate")
    check(caption_of(pictures, "bravo") == "1girl, blue eyes, long hair, smile, outdoors" and "bravo" in message,
          f"duplicate tags removed: {message.strip()!r}")

    fill(page, "train_tools_ds_tag", "from behind")
    choose(page, "train_tools_ds_add_images", "echo.png")
    choose(page, "train_tools_ds_add_images", "foxtrot.png")
    click(page, "train_tools_ds_add")
    message = wait_text(page, "#train_tools_ds_tag_message", "from behind")
    check(caption_of(pictures, "echo") == "from behind" and caption_of(pictures, "foxtrot") == "from behind"
          and "from behind" not in caption_of(pictures, "alpha"), f"tag added to the chosen images only: {message.strip()!r}")

    click(page, "train_tools_ds_bind_propose")
    page.wait_for_selector("#train_tools_ds_bind_tags label", timeout=LONG)
    proposed = page.locator("#train_tools_ds_bind_tags label").all_inner_texts()
    page.screenshot(path=str(out / "dataset-3-bind-proposed.png"), full_page=True)
    check(any(p.startswith("blue eyes") and "eye colour" in p for p in proposed)
          and any(p.startswith("long hair") for p in proposed)
          and not any(p.startswith(("1girl", "outdoors", "hat")) for p in proposed), f"proposed feature tags: {proposed}")
    click(page, "train_tools_ds_bind_confirm")
    message = wait_text(page, "#train_tools_ds_tag_message", "Removed")
    texts = all_captions(pictures)
    check(not any("blue eyes" in t or "long hair" in t for t in texts.values()) and "1girl" in texts["alpha"]
          and TRIGGER in texts["alpha"], f"bound features removed, the rest kept: {message.strip()!r}")
    check("Undo: Removed 'blue eyes'" in page.locator("#train_tools_ds_undo").inner_text(),
          "the confirmation is one undo step")


def check_image_editing(page: Page, pictures: Path, out: Path) -> None:
    thumbnails = page.locator("#train_tools_ds_gallery .thumbnail-item")
    check(thumbnails.count() == 6, f"the gallery shows the six pictures ({thumbnails.count()})")
    thumbnails.nth(0).click()
    page.wait_for_function("document.querySelector('#train_tools_ds_selected textarea').value === 'alpha.png'",
                           timeout=LONG)
    tags = page.locator("#train_tools_ds_image_tags textarea").input_value()
    check(tags == caption_of(pictures, "alpha"), f"the selected picture's tags are shown: {tags!r}")
    fill(page, "train_tools_ds_image_tags", f"{TRIGGER}, 1girl, red dress, looking at viewer")
    click(page, "train_tools_ds_image_save")
    message = wait_text(page, "#train_tools_ds_tag_message", "Edited the tags of alpha.png")
    check(caption_of(pictures, "alpha") == f"{TRIGGER}, 1girl, red dress, looking at viewer",
          f"per-image edit saved: {message.strip()!r}")

    page.locator("#train_tools_ds_crop label", has_text="Square").click()
    fill(page, "train_tools_ds_resolution", "256")
    page.wait_for_selector("#train_tools_ds_focus img", timeout=LONG)
    focus = page.locator("#train_tools_ds_focus img")
    box = focus.bounding_box()
    focus.click(position={"x": box["width"] * 0.5, "y": box["height"] * 0.15})
    message = wait_text(page, "#train_tools_ds_focus_message", "cropped around")
    page.wait_for_timeout(1000)
    page.locator("#train_tools_ds_focus").first.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "dataset-4-focus.png"), full_page=True)
    with Image.open(pictures / "alpha.png") as alpha:
        size = alpha.size
    check(size == (256, 256) and "(0.50, 0.1" in message, f"click-to-focus re-made alpha.png at {size}: {message.strip()!r}")
    check(caption_of(pictures, "alpha") == f"{TRIGGER}, 1girl, red dress, looking at viewer", "its caption is untouched")


def check_tagging(page: Page, pictures: Path, model_folder: Path, out: Path) -> None:
    """A real run on a tiny WD14-shaped model: captions get the tagger's tags after the trigger, minus the blacklist."""
    choose(page, "train_tools_ds_tagger", f"WD14: {model_folder.name}")
    page.locator("#train_tools_ds_general_threshold input[type=number]").fill("0.3")
    fill(page, "train_tools_ds_blacklist", "white background")
    before = all_captions(pictures)
    options = TagOptions(mode="append", prefix=TRIGGER, blacklist="white background", general_threshold=0.3)
    tagger = WD14Tagger(model_folder)
    expected = {p.stem: ", ".join(merge_tags(split_tags(before.get(p.stem, "")),
                                             tagger.tags(load_rgb(p), general_threshold=0.3), options))
                for p in sorted(pictures.glob("*.png"))}
    click(page, "train_tools_ds_tag_run")
    page.wait_for_selector("#train_tools_ds_progress_box .progressDiv", state="attached", timeout=10000)
    check(True, "the WebUI's progress bar appears under the Tag button")
    status = wait_text(page, "#train_tools_ds_tag_status", "tagged")
    page.locator("#train_tools_ds_tag_status").first.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "dataset-5-tagged.png"), full_page=False)
    check("6 picture(s) tagged" in status, f"tagging report: {status.strip()[:120]!r}")
    check(all_captions(pictures) == expected and expected != before,
          "captions on disk: trigger first, the model's tags above the threshold appended, the blacklist left out")
    new_tag = next(tag for text in expected.values() for tag in split_tags(text) if tag not in " ".join(before.values()))
    wait_text(page, "#train_tools_ds_tag_table", new_tag)
    check(True, f"the tag table shows the new tags ({new_tag!r})")


def check_taggers_offline(page: Page, out: Path) -> None:
    choose(page, "train_tools_ds_tagger", "WD14: wd-v1-4-moat-tagger-v2")
    click(page, "train_tools_ds_tag_run")
    page.wait_for_function("(() => { const t = document.querySelector('#train_tools_ds_tag_status').innerText; "
                           "return t.includes('onnxruntime') || t.includes('Cannot download'); })()", timeout=LONG)
    status = page.locator("#train_tools_ds_tag_status").first.inner_text()
    page.locator("#train_tools_ds_tag_status").first.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "dataset-6-wd14.png"), full_page=False)
    if "Cannot download" in status:
        check("huggingface.co/SmilingWolf/wd-v1-4-moat-tagger-v2" in status and "TrainTools-taggers" in status,
              f"WD14 offline: {status.strip()[:200]!r}")
    else:
        check("needs onnxruntime" in status and page.locator("#train_tools_ds_install_onnxruntime").is_visible(),
              f"WD14 without onnxruntime: {status.strip()[:160]!r}, with an Install button")
        click(page, "train_tools_ds_install_onnxruntime")
        status = wait_text(page, "#train_tools_ds_tag_status", "onnxruntime", timeout=LONG)
        check("--skip-install" in status or "installed" in status, f"Install onnxruntime: {status.strip()[:200]!r}")

    choose(page, "train_tools_ds_tagger", "DeepBooru (WebUI)")
    click(page, "train_tools_ds_tag_run")
    status = wait_text(page, "#train_tools_ds_tag_status", "could not load its model", timeout=LONG)
    page.screenshot(path=str(out / "dataset-7-deepbooru.png"), full_page=False)
    check("DeepBooru (WebUI)" in status, f"DeepBooru offline: {status.strip()[:200]!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:7861")
    parser.add_argument("--projects-dir", type=Path,
                        help="the WebUI's Train Tools folder (default: the folder the page reports)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tiny-tagger", type=Path, help="a WD14-shaped model folder under <models>/"
                        f"{MODELS_SUBFOLDER}/ (tests/tiny_wd14.py writes one): tags the pictures with it")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"ttdata{int(time.time()) % 100000}"
    files = make_pictures(args.out / "inputs")

    with sync_playwright() as playwright:
        browser, page, errors = open_train_tools(playwright, args.url, height=1200)
        first_page = page.locator("#train_tools_pages > .tab-nav > button").first.inner_text()
        check(first_page.strip() == "Dataset", f"the Dataset page comes first ({first_page!r})")
        set_name(page, name)
        fill(page, "train_tools_trigger", TRIGGER)

        pictures = check_import(page, files, name, args.projects_dir, args.out)
        check_health(page, args.out)
        check_tag_editor(page, pictures, args.out)
        check_image_editing(page, pictures, args.out)
        if args.tiny_tagger:
            check_tagging(page, pictures, args.tiny_tagger, args.out)
        check_taggers_offline(page, args.out)
        check_folder_import(page, args.out / "server-folder", pictures, args.out)
        page.screenshot(path=str(args.out / "dataset-8-end.png"), full_page=True)
        check(not errors, f"no page errors ({errors[:3]})")
        browser.close()
    print("all checks passed")


if __name__ == "__main__":
    main()
