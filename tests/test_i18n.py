"""The Chinese catalogue: every user-facing string of the code has an entry, the entries fit their templates, and
the language follows the WebUI's localization names.

The strings are found in the source (no gradio here): every ``tr("…")`` / ``N_("…")`` literal is a catalogue key,
and the places where a user-facing string is written (gradio labels, placeholders, buttons and tab titles in
``scripts/``, the messages of the errors the tab shows, the settings checks and health findings in ``lib_train``)
must hold a ``tr()`` call, not a bare literal. ``tests/webui/check_zh.py`` checks the built UI of a real WebUI.
"""

from __future__ import annotations

import ast
import re
import string
from pathlib import Path

import pytest

from lib_train.common import errors, i18n
from lib_train.common.i18n import CHINESE, ENGLISH, choose_language, language_for_localization, language_scope, tr

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "lib_train").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])
USER_ERRORS = {cls.__name__ for cls in vars(errors).values()
               if isinstance(cls, type) and issubclass(cls, errors.TrainToolsError)} | {"HTTPException"}
# Arguments that are shown to the user: gradio's text keywords, and (callee, position) of messages.
TEXT_KEYWORDS = {"label", "placeholder", "info", "title", "detail"}
SHOWN_KEYWORDS = {"message"}  # Progress(message=…): the WebUI's progress text and the job's status
SHOWN_ARGUMENTS = {("Button", 0), ("Tab", 0), ("Accordion", 0), ("Markdown", 0), ("need", 1), ("add", 2),
                   ("_error", 0), ("_ok", 0), ("_message", 0)}
CJK = re.compile(r"[\u4e00-\u9fff]")


def _callee(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _is_literal(node: ast.AST) -> bool:
    """A string written in place: a literal, an f-string, or a sum with one."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and bool(node.value.strip())
    if isinstance(node, ast.JoinedStr):
        return True
    return isinstance(node, ast.BinOp) and (_is_literal(node.left) or _is_literal(node.right))


def _parsed() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for path in SOURCES]


def catalogue_uses() -> dict[str, list[tuple[str, set[str] | None]]]:
    """Each key used in the code → [(where, the keyword names given to tr, or None when unknown)]."""
    uses: dict[str, list] = {}
    for path, tree in _parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _callee(node) in ("tr", "N_") and node.args:
                key = node.args[0]
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    given = None if _callee(node) == "N_" or any(k.arg is None for k in node.keywords) or \
                        not node.keywords else {k.arg for k in node.keywords}
                    uses.setdefault(key.value, []).append((f"{path.relative_to(ROOT)}:{node.lineno}", given))
    return uses


def unwrapped_strings() -> list[str]:
    """User-facing strings written as bare literals (they would stay English in a Chinese UI)."""
    found = []
    for path, tree in _parsed():
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and _callee(node.exc) in USER_ERRORS:
                shown = [*node.exc.args[:1], *[k.value for k in node.exc.keywords if k.arg == "detail"]]
                found += [f"{where}:{node.lineno}" for arg in shown if _is_literal(arg)]
            if not isinstance(node, ast.Call):
                continue
            found += [f"{where}:{node.lineno} {k.arg}=" for k in node.keywords
                      if k.arg in SHOWN_KEYWORDS and _is_literal(k.value)]
            if str(where).startswith("scripts"):
                found += [f"{where}:{node.lineno} {k.arg}=" for k in node.keywords
                          if k.arg in TEXT_KEYWORDS and _is_literal(k.value)]
            for callee, position in SHOWN_ARGUMENTS:
                if _callee(node) == callee and len(node.args) > position and _is_literal(node.args[position]):
                    found.append(f"{where}:{node.lineno} {callee}()")
    return found


def placeholders(template: str) -> list[str]:
    """The replacement fields of a format template, with their conversion and format spec."""
    return sorted(f"{name}!{conversion}:{spec}" for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None)


def test_every_user_facing_string_goes_through_the_catalogue():
    assert unwrapped_strings() == []


def test_every_key_has_a_chinese_entry():
    zh = i18n.catalogue(CHINESE)
    missing = {key: uses[0][0] for key, uses in catalogue_uses().items() if not zh.get(key)}
    assert missing == {}


def test_no_entry_is_left_over():
    assert sorted(set(i18n.catalogue(CHINESE)) - set(catalogue_uses())) == []


def test_entries_keep_their_fields_and_are_chinese():
    zh = i18n.catalogue(CHINESE)
    for english, chinese in zh.items():
        assert placeholders(chinese) == placeholders(english), english
        letters = re.sub(r"\{[^}]*\}", "", english)
        if re.search(r"[A-Za-z]{3,} [A-Za-z]{2,}", letters):  # a phrase (not a name like "UNet" or "Alpha")
            assert CJK.search(chinese), english


def test_calls_pass_the_fields_their_template_names():
    for key, uses in catalogue_uses().items():
        names = {field.split("!")[0] for field in placeholders(key)}
        for where, given in uses:
            assert given is None or given == names, f"{where}: {key!r} gets {sorted(given)}"


@pytest.mark.parametrize("name, language", [
    ("None", ENGLISH), ("", ENGLISH), (None, ENGLISH), ("ja_JP", ENGLISH), ("ko_KR", ENGLISH),
    ("zh_CN", CHINESE), ("zh-Hans (Stable)", CHINESE), ("zh-Hans (Testing)", CHINESE),
    ("zh-Hans (Stable) [vladmandic]", CHINESE), ("zh_Hans", CHINESE), ("zh", CHINESE),
    ("chinese-all-1024", CHINESE), ("chinese-english-1024", CHINESE), ("简体中文", CHINESE),
    ("zh_TW", ENGLISH), ("zh-Hant", ENGLISH), ("zh_HK", ENGLISH),
])
def test_language_follows_the_localization_name(name, language):
    assert language_for_localization(name) == language


def test_own_setting_and_bilingual_extension():
    assert choose_language("English", "zh_CN") == ENGLISH
    assert choose_language("简体中文", "None") == CHINESE
    assert choose_language("Auto", "zh-Hans (Stable)") == CHINESE
    assert choose_language(None, "None", bilingual_file="zh-Hans (Stable)") == CHINESE  # Localization left at None
    assert choose_language("Auto", "None") == ENGLISH


@pytest.fixture
def chinese():
    i18n.set_language(CHINESE)
    yield
    i18n.set_language(ENGLISH)


def test_run_time_messages_come_out_in_chinese(chinese, tmp_path):
    from lib_train.common.errors import ConfigError
    from lib_train.dataset.health import check_dataset
    from lib_train.engine.config import TrainConfig

    with pytest.raises(ConfigError) as refused:
        TrainConfig(name="x", train_dir=str(tmp_path), output_dir=str(tmp_path), resolution=100).validate()
    assert str(refused.value) == "分辨率必须是 64 的倍数且至少为 64（当前为 100）。"
    (tmp_path / "1_x").mkdir()
    report = check_dataset(tmp_path, 512, 1, 1)
    assert CJK.search(report.summary) and all(CJK.search(f.message) for f in report.findings)


def test_english_stays_the_default_and_scopes_are_per_thread(chinese):
    import threading

    assert tr("Train") == "训练"
    with language_scope(ENGLISH):
        assert tr("epoch {epoch}", epoch=3) == "epoch 3"
        seen = []
        worker = threading.Thread(target=lambda: seen.append(tr("epoch {epoch}", epoch=3)))
        worker.start()
        worker.join()
        assert CJK.search(seen[0])  # another thread is not inside this scope
    assert CJK.search(tr("epoch {epoch}", epoch=3))


def test_grid_label_words_stay_english_where_the_label_font_has_no_chinese(chinese):
    from lib_train.preview.grid_image import default_label_font, font_draws
    from lib_train.preview.grid_spec import GridSpec

    font = default_label_font(16)  # like the WebUI's default Roboto: Latin glyphs only
    assert font_draws(font, "epoch 3, weight: 0.5") and not font_draws(font, tr("epoch {epoch}", epoch=3))
    spec = GridSpec(prompt="x", weights=[0.5, 1.0])
    assert spec.axis_labels([])[0] == ["权重：0.5", "权重：1"]
    with language_scope(ENGLISH):  # what lib_train.webui.grid does when font_draws says no
        assert spec.axis_labels([])[0] == ["weight: 0.5", "weight: 1"]
