"""The three ways of decoding (reduced-scale PIL, full-size tensors, JPEG bytes for the device),
the EXIF orientation applied to tensors, and glibc's allocator setting."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.allocator import keep_large_buffers
from pipeline.data import EvalTransform, ImageFiles, decode_jpeg, exif_orientation, image_loader, open_rgb, upright
from pipeline.device_decode import decode_batch

TRANSFORM = EvalTransform(40, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


def photo(width=90, height=60, seed=0) -> Image.Image:
    """Smooth colours with some texture: what JPEG is for, and asymmetric enough to show a turn."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, orientation: int = 1, **save) -> bytes:
    exif = image.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95, **save)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_tensors_as_pil_turns_images(orientation):
    data = jpeg_bytes(photo(), orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB")))
    assert exif_orientation(data) == orientation
    got = upright(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)), orientation)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), expected)


@pytest.fixture
def mixed_folder(tmp_path):
    """JPEGs (turned by EXIF, grey, CMYK, progressive, large), a PNG, and a broken JPEG."""
    files = {
        "turned.jpg": jpeg_bytes(photo(seed=1), 6),
        "grey.jpg": jpeg_bytes(photo(seed=2).convert("L")),
        "cmyk.jpg": jpeg_bytes(photo(seed=3).convert("CMYK")),
        "progressive.jpg": jpeg_bytes(photo(seed=4), progressive=True),
        "large.jpg": jpeg_bytes(photo(900, 700, seed=5)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    photo(seed=6).save(tmp_path / "plain.png")
    (tmp_path / "broken.jpg").write_bytes(files["large.jpg"][:200] + b"\x00" * 64)
    return tmp_path, [*files, "plain.png", "broken.jpg"]


def pixels_of(folder, names, decode, device="cpu") -> tuple[torch.Tensor, list[str]]:
    loader = image_loader(ImageFiles(folder, names, TRANSFORM, decode), batch_size=len(names), workers=0, device=torch.device("cpu"))
    (batch,) = list(loader)
    pixels, errors = decode_batch(batch, TRANSFORM, torch.device(device))
    return pixels.cpu(), errors


def test_full_decoding_gives_pil_full_size_pixels(mixed_folder):
    folder, names = mixed_folder
    pixels, errors = pixels_of(folder, names, "full")
    for name, image, error in zip(names, pixels, errors, strict=True):
        if name == "broken.jpg":
            assert error, "a broken JPEG is recorded as failed"
            continue
        assert error == "", (name, error)
        expected = TRANSFORM.pixels(open_rgb(folder / name)).int()
        assert (image.int() - expected).abs().max() <= 2, name


def test_device_decoding_of_jpeg_bytes_matches_full_decoding(mixed_folder):
    # decode_batch runs the GPU path's code on the CPU: same calls, device="cpu"
    folder, names = mixed_folder
    full, full_errors = pixels_of(folder, names, "full")
    device, device_errors = pixels_of(folder, names, "device")
    assert [bool(e) for e in device_errors] == [bool(e) for e in full_errors] == [n == "broken.jpg" for n in names]
    assert (device.int() - full.int()).abs().max() <= 1


def test_device_batch_with_a_file_the_decoder_rejects_decodes_the_others(mixed_folder, monkeypatch):
    folder, names = mixed_folder
    import pipeline.device_decode as device_decode

    real = device_decode.decode_jpeg
    cmyk = (folder / "cmyk.jpg").read_bytes()

    def picky(jpegs, device):  # as nvJPEG might: one file it cannot handle fails the whole call
        if any(j.numpy().tobytes() == cmyk for j in jpegs):
            raise RuntimeError("unsupported colour space")
        return real(jpegs, device)

    monkeypatch.setattr(device_decode, "decode_jpeg", picky)
    pixels, errors = pixels_of(folder, names, "device")
    assert [bool(e) for e in errors] == [n == "broken.jpg" for n in names]
    expected = TRANSFORM.pixels(open_rgb(folder / "cmyk.jpg")).int()  # decoded by PIL instead
    assert (pixels[names.index("cmyk.jpg")].int() - expected).abs().max() <= 2


def test_draft_decoding_reads_large_jpegs_smaller_and_keeps_the_rest(mixed_folder):
    folder, names = mixed_folder
    draft, errors = pixels_of(folder, names, "draft")
    full, _ = pixels_of(folder, names, "full")
    for name, a, b, error in zip(names, draft, full, errors, strict=True):
        if name != "broken.jpg":
            assert error == ""
            # a reduced DCT scale changes pixels a little, and only for JPEGs much larger than the input
            difference = (a.float() - b.float()).abs().mean()
            assert (difference < 6) if name == "large.jpg" else (a.int() - b.int()).abs().max() <= 2, name


def test_keep_large_buffers_is_on_in_pipe_processes_and_can_be_turned_off():
    code = "from pipeline.allocator import keep_large_buffers; print(keep_large_buffers())"
    env = {k: v for k, v in os.environ.items() if k != "PIPE_MALLOC"}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "PIPE_MALLOC": "system"})
    assert on.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")
    assert off.stdout.strip() == "False"
    assert keep_large_buffers() in (True, False)  # harmless to call again in this process


@pytest.mark.cuda
def test_gpu_decoding_matches_cpu_full_decoding(mixed_folder):
    folder, names = mixed_folder
    cpu, cpu_errors = pixels_of(folder, names, "full")
    gpu, gpu_errors = pixels_of(folder, names, "device", device="cuda")
    assert [bool(e) for e in gpu_errors] == [bool(e) for e in cpu_errors]
    ok = [i for i, e in enumerate(cpu_errors) if not e]
    # nvJPEG's inverse DCT and the GPU's resampling round differently from libjpeg-turbo's
    assert (gpu[ok].float() - cpu[ok].float()).abs().mean() < 2
