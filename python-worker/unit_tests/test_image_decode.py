"""Images as the worker decodes them before the processor sees them: upright as
the camera's EXIF orientation says, an animation's first frame, always RGB; and
the same pixels give the same content key whatever the file's format."""

from __future__ import annotations

import io

from PIL import Image

from mlxd_worker.requests.vision import content_key, decode_image, open_image


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def decoded(data: bytes) -> Image.Image:
    return decode_image(open_image(data, 0), 0)


def test_a_photo_is_turned_upright_as_its_exif_says() -> None:
    # 40 wide, 20 high, left half red; orientation 6: the camera was turned a
    # quarter clockwise, so the upright picture is 20 wide, 40 high, red on top.
    photo = Image.new("RGB", (40, 20), "blue")
    photo.paste("red", (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decoded(encoded(photo, "JPEG", exif=exif.tobytes(), quality=95))
    assert upright.size == (20, 40) and upright.mode == "RGB"
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # Without the tag it stays as stored.
    assert decoded(encoded(photo, "JPEG")).size == (40, 20)


def test_an_animation_gives_its_first_frame_in_rgb() -> None:
    frames = [Image.new("P", (8, 8), 1), Image.new("P", (8, 8), 2)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    first = decoded(out.getvalue())
    assert first.mode == "RGB" and first.getpixel((0, 0)) == (255, 0, 0)


def test_the_same_pixels_have_the_same_key_in_any_lossless_format() -> None:
    picture = Image.new("RGB", (16, 16), (10, 20, 30))
    picture.putpixel((3, 3), (200, 0, 0))
    as_png, as_webp = decoded(encoded(picture, "PNG")), decoded(encoded(picture, "WEBP", lossless=True))
    assert content_key([as_png]) == content_key([as_webp])
    with_alpha = decoded(encoded(picture.convert("RGBA"), "PNG"))
    assert with_alpha.mode == "RGB" and content_key([with_alpha]) == content_key([as_png])
    picture.putpixel((4, 4), (0, 0, 0))
    assert content_key([decoded(encoded(picture, "PNG"))]) != content_key([as_png])
