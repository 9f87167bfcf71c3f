"""The WD14 tagger on a tiny ONNX model with the real models' signature: preprocessing, thresholds, formatting."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from lib_train.common.errors import CheckpointError, ConfigError, TrainToolsError
from lib_train.tagging.wd14 import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    KNOWN_MODELS,
    MODELS_SUBFOLDER,
    WD14Tagger,
    available_models,
    download_model,
    execution_providers,
    format_tag,
    is_kaomoji,
    onnxruntime_package,
    preprocess,
)
from tests.tiny_wd14 import expected_confidences, write_tiny_wd14

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture
def tagger(tmp_path) -> WD14Tagger:
    return WD14Tagger(write_tiny_wd14(tmp_path / "tiny"))


def square(colour, size=32, mode="RGB") -> Image.Image:
    return Image.new(mode, (size, size), colour)


def test_tags_follow_the_colour_with_ratings_dropped_and_most_confident_first(tagger):
    assert tagger.predict(square(RED))["general"] > 0.9  # a confident rating ...
    assert tagger.tags(square(RED)) == ["red background", "hat \\(object\\)"]  # ... never becomes a tag
    assert tagger.tags(square(BLUE)) == ["^_^", "long hair"]
    assert tagger.tags(square(GREEN)) == ["o_o", "hatsune miku"]


def test_general_and_character_thresholds_apply_to_their_own_category(tagger):
    assert tagger.tags(square(BLUE), general_threshold=0.4) == ["^_^"]  # long_hair is at 0.38
    assert tagger.tags(square(RED), general_threshold=0.7) == ["red background"]  # hat at 0.62
    # kagamine_rin (0.82) is a character: the general threshold does not let it in, the character one does.
    assert tagger.tags(square(GREEN), general_threshold=0.1, character_threshold=0.85)[:2] == ["o_o", "hatsune miku"]
    assert "kagamine rin" not in tagger.tags(square(GREEN), general_threshold=0.1, character_threshold=0.85)
    assert tagger.tags(square(GREEN), character_threshold=0.8) == ["o_o", "hatsune miku", "kagamine rin"]


def test_model_sees_bgr_on_white_padded_square(tagger):
    # Every confidence matches the model's formula for the picture as the WD models expect it prepared.
    cases = [
        (square(RED), RED),
        (square((0, 0, 0, 0), mode="RGBA"), (255, 255, 255)),  # transparent -> white
        (Image.new("RGB", (32, 16), RED), (255, 127.5, 127.5)),  # wide: white bands above and below
        (square(BLUE, size=80), BLUE),  # resized to the model's 32
    ]
    for image, mean in cases:
        got = tagger.predict(image)
        for name, value in expected_confidences(mean).items():
            assert got[name] == pytest.approx(value, abs=2e-3), (image.size, image.mode, name)


def test_preprocess_layout():
    image = Image.new("RGB", (10, 4), (10, 20, 30))
    pixels = preprocess(image, 16)
    assert pixels.shape == (1, 16, 16, 3) and pixels.dtype.name == "float32"
    assert pixels[0, 8, 8].tolist() == [30, 20, 10]  # BGR, 0..255
    assert pixels[0, 0, 0].tolist() == [255, 255, 255]  # padding is white


def test_input_size_is_read_from_the_model(tmp_path):
    tagger = WD14Tagger(write_tiny_wd14(tmp_path / "t24", size=24))
    assert tagger.tags(square(RED, size=100)) == ["red background", "hat \\(object\\)"]
    assert tagger.input_size == 24


def test_lazy_load_unload_and_session(tagger):
    assert not tagger.loaded
    tagger.tags(square(RED))
    assert tagger.loaded
    tagger.unload()
    assert not tagger.loaded
    with pytest.raises(RuntimeError), tagger.session(general_threshold=0.7) as tag:
        assert tagger.loaded and tag(square(RED)) == ["red background"]
        raise RuntimeError("the caller failed")
    assert not tagger.loaded


@pytest.mark.parametrize(
    "raw, caption",
    [("long_hair", "long hair"), ("hat_(object)", "hat \\(object\\)"), ("^_^", "^_^"), (">_<", ">_<"),
     ("o_o", "o_o"), ("(o)_(o)", "\\(o\\)_\\(o\\)"), ("1girl", "1girl"), ("x_x", "x_x"), ("no_humans", "no humans")],
)
def test_format_tag(raw, caption):
    assert format_tag(raw) == caption


def test_kaomoji_detection_keeps_ordinary_tags():
    assert is_kaomoji("^_^") and is_kaomoji("0_0") and is_kaomoji("|_|")
    assert not is_kaomoji("a_girl") and not is_kaomoji("solo") and not is_kaomoji("looking_at_viewer")


def test_tag_list_and_model_must_agree(tmp_path):
    with pytest.raises(CheckpointError, match="predicts 11 tags but .*selected_tags.csv lists 12"):
        WD14Tagger(write_tiny_wd14(tmp_path / "bad", output_tags=11)).load()
    folder = write_tiny_wd14(tmp_path / "nocat")
    (folder / "selected_tags.csv").write_text("tag_id,name,count\n1,solo,3\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="nocat.*needs the columns name and category"):
        WD14Tagger(folder).load()
    (folder / "model.onnx").write_bytes(b"not onnx")
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n1,solo,0,3\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="Cannot load the tagger model .*nocat"):
        WD14Tagger(folder).load()


def test_missing_onnxruntime_says_how_to_install(tagger, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an absent package looks like to import
    with pytest.raises(TrainToolsError, match="pip install onnxruntime-gpu.*pip install onnxruntime"):
        tagger.load()


def test_providers():
    assert onnxruntime_package(True) == "onnxruntime-gpu>=1.17,<1.25"
    assert onnxruntime_package(False) == "onnxruntime>=1.17,<1.25"
    assert execution_providers(True, [CUDA_PROVIDER, CPU_PROVIDER]) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert execution_providers(False, [CUDA_PROVIDER, CPU_PROVIDER]) == [CPU_PROVIDER]
    assert execution_providers(True, ["AzureExecutionProvider", CPU_PROVIDER]) == [CPU_PROVIDER]
    assert execution_providers(False) == [CPU_PROVIDER]  # this onnxruntime's own list


def test_cuda_requested_without_it_runs_on_the_cpu(tmp_path):
    import onnxruntime

    if CUDA_PROVIDER in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    tagger = WD14Tagger(write_tiny_wd14(tmp_path / "tiny"), [CUDA_PROVIDER, CPU_PROVIDER])
    assert tagger.tags(square(RED)) == ["red background", "hat \\(object\\)"]
    assert tagger.active_providers == [CPU_PROVIDER]  # what the tab can show


def test_downloaded_or_own_folders_are_used_from_disk(tmp_path):
    models = tmp_path / "models"
    known = write_tiny_wd14(models / MODELS_SUBFOLDER / "wd-vit-tagger-v3")
    own = write_tiny_wd14(models / MODELS_SUBFOLDER / "my-tagger")
    (models / MODELS_SUBFOLDER / "half-copied").mkdir()
    (models / MODELS_SUBFOLDER / "half-copied" / "model.onnx").write_bytes(b"")
    elsewhere = write_tiny_wd14(tmp_path / "elsewhere")
    # HF_HUB_OFFLINE is set for the tests: none of these may need the hub.
    assert download_model("wd-vit-tagger-v3", models) == known
    assert download_model("my-tagger", models) == own
    assert download_model(str(elsewhere), models) == elsewhere
    assert available_models(models) == list(KNOWN_MODELS) + ["my-tagger"]
    assert len(KNOWN_MODELS) == 10 and all(repo.startswith("SmilingWolf/") for repo in KNOWN_MODELS.values())


def test_download_problems_name_the_folder(tmp_path):
    models = tmp_path / "models"
    with pytest.raises(ConfigError, match="Unknown tagger 'nope'.*wd-eva02-large-tagger-v3"):
        download_model("nope", models)
    with pytest.raises(ConfigError, match="needs both model.onnx and selected_tags.csv"):
        download_model(str(tmp_path), models)
    with pytest.raises(ConfigError, match="must be a model name or the full path"):
        download_model("../../elsewhere", models)
    # Offline (as in the tests), a known model that is not on disk yet says where to put the files.
    target = models / MODELS_SUBFOLDER / "wd-swinv2-tagger-v3"
    with pytest.raises(CheckpointError, match=f"SmilingWolf/wd-swinv2-tagger-v3.*into {target}"):
        download_model("wd-swinv2-tagger-v3", models)
