import pytest
from PIL import Image

from lib_train.dataset.buckets import (
    centre_crop_box,
    choose_no_upscale_bucket,
    choose_predefined_bucket,
    cover_size,
    make_bucket_resolutions,
    mean_ar_error,
    resize_to_bucket,
)

# Hand-computed for resolution 512 (area 262144), min 256, max 1024, step 64:
# w=256 -> h=min(1024, 1024)=1024; 320 -> 768; 384 -> 640; 448 -> 576; 512 -> 512; 576 -> 448;
# 640 -> 384; 704 -> 320; 768 -> 320; 832 -> 256; 896 -> 256; 960 -> 256; 1024 -> 256.
SD15_BUCKETS = sorted(
    {
        (256, 1024), (1024, 256), (320, 768), (768, 320), (384, 640), (640, 384), (448, 576), (576, 448),
        (512, 512), (704, 320), (320, 704), (832, 256), (256, 832), (896, 256), (256, 896), (960, 256),
        (256, 960),
    }
)


def test_bucket_resolutions_512():
    resolutions = make_bucket_resolutions(512, 256, 1024, 64)
    assert resolutions == SD15_BUCKETS
    assert len(resolutions) == 17
    assert {(512, 512), (448, 576), (576, 448), (384, 640), (640, 384), (1024, 256)} <= set(resolutions)
    assert all((h, w) in resolutions for w, h in resolutions)
    assert all(w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024 for w, h in resolutions)
    assert all(w * h <= 512 * 512 for w, h in resolutions)


def test_bucket_resolutions_768_with_tight_limits():
    # area 589824: w=512 -> 1152 capped to 1024; 576 -> 1024; 640 -> 896; 704 -> 832; 768 -> 768;
    # 832 -> 704; 896 -> 640; 960 -> 576; 1024 -> 576.
    assert make_bucket_resolutions(768, 512, 1024, 64) == sorted(
        {(512, 1024), (1024, 512), (576, 1024), (1024, 576), (640, 896), (896, 640), (704, 832), (832, 704),
         (768, 768), (960, 576), (576, 960)}
    )


def test_bucket_resolutions_square_is_floored_to_step():
    # sqrt(600²) = 600 -> 576
    assert (576, 576) in make_bucket_resolutions(600, 256, 1024, 64)


def test_limits_off_the_step_are_moved_onto_it_as_kohya_does():
    # kohya's adjust_min_max_bucket_reso_by_steps: the minimum down to a multiple of the step, the maximum up.
    resolutions = make_bucket_resolutions(512, 300, 1000, 64)
    assert resolutions == make_bucket_resolutions(512, 256, 1024, 64) == SD15_BUCKETS
    assert make_bucket_resolutions(512, 200, 1030, 64) == make_bucket_resolutions(512, 192, 1088, 64)


@pytest.mark.parametrize(
    ("size", "bucket", "resized", "error"),
    [
        ((512, 512), (512, 512), (512, 512), 0.0),
        ((448, 576), (448, 576), (448, 576), 0.0),  # exact bucket size
        ((1024, 768), (576, 448), (597, 448), 576 / 448 - 4 / 3),  # 1.333 -> 1.286 beats 1.667
        ((600, 1000), (384, 640), (384, 640), 0.0),
        ((3000, 500), (1024, 256), (1536, 256), 4.0 - 6.0),  # wider than any bucket
        ((100, 100), (512, 512), (512, 512), 0.0),  # small images are enlarged to cover
    ],
)
def test_choose_predefined_bucket(size, bucket, resized, error):
    choice = choose_predefined_bucket(size, SD15_BUCKETS)
    assert choice.bucket == bucket
    assert choice.resized_size == resized
    assert choice.ar_error == pytest.approx(error)


def test_choose_predefined_bucket_tie_takes_first():
    # AR 2 is 1 away from both 1.0 and 3.0.
    assert choose_predefined_bucket((256, 128), [(128, 128), (192, 64)]).bucket == (128, 128)
    assert choose_predefined_bucket((256, 128), [(192, 64), (128, 128)]).bucket == (192, 64)


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [
        ((300, 200), (256, 192), (300, 200)),  # below the area: no resize, floor to steps, crop
        ((512, 512), (512, 512), (512, 512)),
        ((1024, 1024), (512, 512), (512, 512)),
        ((2000, 1000), (640, 320), (640, 320)),  # rounding the height keeps AR 2 exactly
        ((1000, 2000), (320, 640), (320, 640)),  # here rounding the width does
        ((1500, 1000), (576, 384), (576, 384)),
        ((2000, 1300), (576, 384), (591, 384)),  # resized size is floored to the bucket, rest cropped
    ],
)
def test_choose_no_upscale_bucket(size, bucket, resized):
    choice = choose_no_upscale_bucket(size, 512, 64)
    assert choice.bucket == bucket
    assert choice.resized_size == resized
    assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])
    assert choice.bucket[0] <= size[0] and choice.bucket[1] <= size[1]  # never upscaled


def test_no_upscale_ignores_min_and_can_go_below_it():
    assert choose_no_upscale_bucket((100, 70), 512, 64).bucket == (64, 64)
    assert choose_no_upscale_bucket((50, 500), 512, 64).bucket == (0, 448)  # caller must refuse


def test_cover_size_matches_one_side_exactly():
    assert cover_size((1000, 500), (512, 512)) == (1024, 512)
    assert cover_size((500, 1000), (512, 512)) == (512, 1024)
    assert cover_size((300, 200), (576, 384)) == (576, 384)


def test_centre_crop_box():
    assert centre_crop_box((1024, 512), (512, 512)) == (256, 0, 768, 512)
    assert centre_crop_box((513, 512), (512, 512)) == (0, 0, 512, 512)


def _striped(size, edge, middle=(0, 0, 255), border=(255, 0, 0)):
    """`middle` everywhere except `edge`-wide bands of `border` at the left and right."""
    image = Image.new("RGB", size, middle)
    image.paste(border, (0, 0, edge, size[1]))
    image.paste(border, (size[0] - edge, 0, size[0], size[1]))
    return image


def test_resize_to_bucket_downscale_crops_the_centre():
    image = _striped((2000, 1000), 200)
    result = resize_to_bucket(image, (512, 512))
    assert result.size == (512, 512)
    assert result.getpixel((256, 256)) == (0, 0, 255)
    # The red side bands (about 102 px after scaling to 1024 wide) fall outside the centred crop.
    assert result.getpixel((0, 256))[2] > 240 and result.getpixel((511, 256))[2] > 240
    expected = image.resize((1024, 512), Image.Resampling.LANCZOS).crop((256, 0, 768, 512))
    assert result.tobytes() == expected.tobytes()


def test_resize_to_bucket_upscale_uses_bicubic():
    image = _striped((100, 60), 10, middle=(0, 200, 0))
    result = resize_to_bucket(image, (448, 576))
    assert result.size == (448, 576)
    assert result.getpixel((224, 288)) == (0, 200, 0)
    expected = image.resize((960, 576), Image.Resampling.BICUBIC).crop((256, 0, 704, 576))
    assert result.tobytes() == expected.tobytes()


def test_resize_to_bucket_with_no_upscale_size_only_crops():
    image = Image.effect_noise((500, 400), 60).convert("RGB")
    choice = choose_no_upscale_bucket(image.size, 512, 64)
    assert choice.bucket == (448, 384)
    result = resize_to_bucket(image, choice.bucket, choice.resized_size)
    assert result.tobytes() == image.crop((26, 8, 474, 392)).tobytes()


@pytest.mark.parametrize("size", [(640, 480), (123, 457), (2000, 300), (512, 512)])
def test_resize_to_bucket_always_gives_bucket_size(size):
    image = Image.new("RGB", size, (10, 20, 30))
    for bucket in SD15_BUCKETS:
        assert resize_to_bucket(image, bucket).size == bucket


def test_resize_to_bucket_refuses_a_size_that_does_not_cover():
    with pytest.raises(ValueError):
        resize_to_bucket(Image.new("RGB", (100, 100)), (64, 64), (60, 100))


def test_mean_ar_error_is_mean_of_absolute_errors():
    assert mean_ar_error([0.1, -0.3, 0.0]) == pytest.approx(0.4 / 3)
