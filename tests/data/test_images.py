import pickle

import numpy as np
import pytest
from PIL import Image

from dino_bridge.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image


def _rgb_at(image, x, y):
    return image.getpixel((x, y))


def test_rgb_round_trip(tmp_path):
    pixels = np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_grayscale_becomes_equal_channels(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (4, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_palette_with_and_without_transparency(tmp_path):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    palette_image.save(tmp_path / "p.png")
    image = load_image(tmp_path / "p.png")
    assert image.mode == "RGB"
    assert _rgb_at(image, 0, 0) == (255, 0, 0) and _rgb_at(image, 1, 0) == (0, 0, 255)

    palette_image.save(tmp_path / "pt.png", transparency=1)  # index 1 (blue) is transparent
    image = load_image(tmp_path / "pt.png")
    assert _rgb_at(image, 0, 0) == (255, 0, 0)
    assert _rgb_at(image, 1, 0) == (255, 255, 255)  # composited over white

    palette_image.save(tmp_path / "pt.gif", transparency=1)
    assert _rgb_at(load_image(tmp_path / "pt.gif"), 1, 0) == (255, 255, 255)


def test_rgba_and_la_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    rgba.save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert _rgb_at(image, 0, 0) == (10, 20, 30) and _rgb_at(image, 1, 0) == (255, 255, 255)

    la = Image.new("LA", (1, 1), (0, 128))
    la.save(tmp_path / "la.png")
    assert _rgb_at(load_image(tmp_path / "la.png"), 0, 0) in [(127, 127, 127), (128, 128, 128)]


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_cmyk(tmp_path, suffix):
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    cmyk.save(tmp_path / f"c{suffix}")
    image = load_image(tmp_path / f"c{suffix}")
    red, green, blue = _rgb_at(image, 4, 4)
    assert image.mode == "RGB" and red < 30 and green > 225 and blue > 225


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 50 * 257, 65535, 128 * 257]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as stored:
        assert stored.mode in ("I;16", "I")
    out = np.asarray(load_image(tmp_path / "d.png"))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 50, 255, 128])


def test_sixteen_bit_big_endian_tiff(tmp_path):
    values = np.array([[0, 100 * 257, 65535]], dtype=">u2")
    image = Image.frombytes("I;16B", (3, 1), values.tobytes())
    image.save(tmp_path / "b.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "b.tif"))[0, :, 1], [0, 100, 255])


def test_float_image_is_min_max_scaled(tmp_path):
    values = np.array([[-2.0, 0.0, 2.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "f.tif"))[0, :, 2], [0, 128, 255])


def test_one_bit(tmp_path):
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1").save(tmp_path / "b.png")
    out = np.asarray(load_image(tmp_path / "b.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 255])


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (30, 10), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    image.save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").size == (10, 30)


def _assert_fails(path, reason_part):
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    message = str(caught.value)
    assert str(path) in message and reason_part in message.lower()
    assert caught.value.path == str(path)
    assert isinstance(caught.value, OSError)
    return caught.value


def test_failures_name_the_file_and_reason(tmp_path):
    _assert_fails(tmp_path / "missing.jpg", "does not exist")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _assert_fails(tmp_path / "empty.jpg", "empty")
    (tmp_path / "text.jpg").write_text("this is not an image\n" * 10)
    _assert_fails(tmp_path / "text.jpg", "not a recognised image")
    _assert_fails(tmp_path, "directory")


def test_truncated_jpeg_fails_at_load(tmp_path):
    pixels = np.random.RandomState(1).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _assert_fails(tmp_path / "cut.jpg", "truncated")


def test_decompression_bomb(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _assert_fails(tmp_path / "big.png", "decompression bomb")


def test_error_pickles():
    error = pickle.loads(pickle.dumps(ImageLoadError("/x/y.jpg", "broken")))
    assert error.path == "/x/y.jpg" and error.reason == "broken" and "/x/y.jpg" in str(error)


def test_extensions_cover_common_formats():
    for extension in (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"):
        assert extension in IMAGE_EXTENSIONS
