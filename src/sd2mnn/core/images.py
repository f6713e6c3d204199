"""PNG files as MNN's C++ runtime writes them, with sd2mnn's metadata, and image comparison.

``diffusion_demo`` ends with ``CV::imwrite(path, image)`` (MNN tools/cv imgcodecs.cpp), which
encodes with stb_image_write (``stbi_write_png``: 8-bit RGB, no other chunks). ``write_png``
encodes with that same code, through the ``MNN`` package's ``MNN.cv.imwrite``, then adds the
metadata as tEXt/iTXt chunks before the image data: drop those chunks and the file is byte for
byte the C++ runtime's (same MNN version). Without ``MNN.cv`` it falls back to Pillow
(``PngInfo``): the same pixels, other bytes.

``compare`` gives PSNR and SSIM of two images and a picture of where they differ.
"""
from __future__ import annotations

import errno
import math
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from sd2mnn.errors import DiskSpaceError, InputError, Sd2MnnError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\0\0\0\0IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def check_png_path(path: str | os.PathLike) -> Path:
    """Refuse an output path that cannot take a PNG before minutes of work go into it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"{path} does not end in .png; sd2mnn writes PNG files (e.g. -o out.png)")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name such as {path / 'out.png'}")
    return _check_parent(path)


def _check_parent(path: Path) -> Path:
    """``path``'s folder exists and takes new entries."""
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{parent} is a file, not a folder; give a path inside a folder (e.g. out/{path.name})")
    if not parent.is_dir():
        raise InputError(f"{parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{parent} is not writable; choose another output folder")
    probe_folder(parent, path)
    return path


VIDEO_NAME = "video.webp"  # the animation a video folder holds beside its frames
VIDEO_FPS = 16  # Wan2.1's frame rate (diffusers' export_to_video in its examples)


def frame_name(index: int) -> str:
    """wan_diffusion_demo's frame file names (wan_diffusion.cpp saveVideoFrames)."""
    return f"frame_{index:04d}.png"


def check_video_folder(path: str | os.PathLike) -> Path:
    """Refuse an output folder for a video that cannot be made, before minutes of work go into it."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        raise InputError(f"{path}: a video is a folder of frames (frame_0000.png, ... and {VIDEO_NAME}); "
                         "give a folder name, e.g. -o clip")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file; give a folder name for the video's frames")
    return _check_parent(path)


def write_video(folder: str | os.PathLike, frames: np.ndarray, metadata: Mapping[str, str] | None = None) -> Path:
    """Write uint8 RGB ``frames`` [F, H, W, 3] into ``folder``: each as a PNG named as the demo
    names them (with ``metadata``), and all as one animated lossless WebP. Staged beside
    ``folder`` and renamed into place: a failure leaves no partial folder (and an old one as it was)."""
    from PIL import Image

    folder = check_video_folder(folder)
    staged = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = staged.parent / f"{staged.name}-old"
    try:
        for i, frame in enumerate(frames):
            write_png(staged / frame_name(i), frame, metadata)
        images = [Image.fromarray(frame, "RGB") for frame in frames]
        images[0].save(staged / VIDEO_NAME, format="WEBP", save_all=True, append_images=images[1:], lossless=True,
                       duration=round(1000 / VIDEO_FPS), loop=0)
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(staged, folder)
        except OSError:
            if old.exists():
                os.replace(old, folder)  # the earlier video back in place
            raise
    except OSError as err:
        raise write_failure(folder, err) from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def probe_folder(folder: Path, target: Path | None = None) -> None:
    """Make and remove a scratch entry in ``folder``: some folders refuse writes that access()
    allows (a read-only mount, /proc). Raises write_failure's error for ``target`` (or the folder)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sd2mnn-probe-", dir=folder))
    except OSError as err:
        raise write_failure(target or folder, err) from None


def write_failure(path: Path, err: OSError) -> Sd2MnnError:
    """A one-line error for an output that could not be written (disk full, no permission...)."""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskSpaceError(f"cannot write {path}: {reason}; free some space there or write to another folder")
    return InputError(f"cannot write {path}: {reason}; choose another output path")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def text_chunk(key: str, value: str) -> bytes:
    """tEXt when key and value are Latin-1 (what PNG's tEXt holds), else an uncompressed iTXt."""
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # iTXt: keyword, compression flag 0, method 0, empty language tag, empty translated keyword.
        return _chunk(b"iTXt", key.encode("latin-1", "replace") + b"\0\0\0\0\0" + value.encode("utf-8"))


def add_text_chunks(png: bytes, metadata: Mapping[str, str]) -> bytes:
    """``png`` with one text chunk per metadata item, right after IHDR (before the image data)."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG stream")
    ihdr_end = len(PNG_SIGNATURE) + 8 + struct.unpack(">I", png[8:12])[0] + 4
    chunks = b"".join(text_chunk(str(k), str(v)) for k, v in metadata.items())
    return png[:ihdr_end] + chunks + png[ihdr_end:]


def encode_png_like_mnn(pixels: np.ndarray, scratch: Path) -> bytes | None:
    """The bytes MNN's ``CV::imwrite`` writes for RGB ``pixels`` (None without ``MNN.cv``).

    The C++ hands imwrite its image after ``cvtColor(image, COLOR_BGR2RGB)`` and imwrite swaps
    the channels back before stb encodes them: the file holds the VAE's channels in their own
    order (channel 0 = red). Doing the same two swaps here keeps the code path identical.
    """
    try:
        import MNN.cv as cv
        import MNN.expr as F
    except ImportError:
        return None
    image = F.const(np.ascontiguousarray(pixels), list(pixels.shape), F.NHWC, F.uint8)
    image = cv.cvtColor(image, cv.COLOR_BGR2RGB)  # stable_diffusion.cpp vae_decoder()
    try:
        if not cv.imwrite(str(scratch), image):  # imgcodecs.cpp imwrite(): swaps again, stb encodes
            return None
        png = scratch.read_bytes()
        # stb does not check its writes: on a full disk the file ends early. The caller then
        # writes with Pillow, which reports the real error.
        return png if png.endswith(PNG_END) else None
    finally:
        scratch.unlink(missing_ok=True)


def write_png(path: str | os.PathLike, pixels, metadata: Mapping[str, str] | None = None) -> Path:
    """Write uint8 RGB ``pixels`` [H, W, 3] (or a PIL image) to ``path`` with ``metadata``.

    Atomic: the image is written to a temporary file beside ``path`` and renamed into place, so an
    interrupted run or a full disk leaves no partial PNG (and an existing ``path`` as it was).
    Raises DiskSpaceError or InputError when the file cannot be written.
    """
    path = check_png_path(path)
    if not isinstance(pixels, np.ndarray):  # a PIL image: its info carries the metadata
        metadata = dict(pixels.info) if metadata is None else metadata
        pixels = np.asarray(pixels.convert("RGB"))
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 [H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    metadata = {str(k): str(v) for k, v in (metadata or {}).items() if isinstance(v, (str, int, float))}
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        png = encode_png_like_mnn(pixels, tmp)
        if png is not None:
            tmp.write_bytes(add_text_chunks(png, metadata))
        else:
            from PIL import Image
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            for key, value in metadata.items():
                info.add_text(key, value)
            Image.fromarray(pixels, "RGB").save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as err:
        raise write_failure(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, str]]:
    """uint8 RGB pixels [H, W, 3] and the text metadata of an image file; of a video folder
    (frame_0000.png, ... as generate and wan_diffusion_demo write them), its frames [F, H, W, 3]
    and the first frame's metadata."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        return read_frames(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; give an image file (PNG)")
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{path} is not an image Pillow can read ({err}); give a PNG file") from None
    return pixels, text


def read_frames(folder: Path) -> tuple[np.ndarray, dict[str, str]]:
    """A video folder's frames, frame_0000.png on without a gap, all of one size."""
    count = 0
    while (folder / frame_name(count)).is_file():
        count += 1
    if count == 0:
        raise InputError(f"{folder} is a folder without {frame_name(0)}; give an image file (PNG) or a video "
                         "folder of frames (sd2mnn generate's or wan_diffusion_demo's)")
    frames, metadata = zip(*(read_image(folder / frame_name(i)) for i in range(count)))
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise InputError(f"{folder}: its frames are not all of one size ({', '.join(sorted(map(str, sizes)))}); "
                         "regenerate the video")
    return np.stack(frames), metadata[0]


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian_filter(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian blur over the first two axes, 'valid' region only (no padding)."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    size = 2 * radius + 1
    h, w = x.shape[:2]
    rows = sum(t * x[i : h - size + 1 + i] for i, t in enumerate(taps))
    return sum(t * rows[:, i : w - size + 1 + i] for i, t in enumerate(taps))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 0.01, K2 0.03, L 255), per channel, averaged; 1.0 when identical."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.shape[0] < 11 or x.shape[1] < 11:
        raise InputError(f"images of {x.shape[1]}x{x.shape[0]} are too small for SSIM (11x11 window)")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _gaussian_filter(x), _gaussian_filter(y)
    vx = _gaussian_filter(x * x) - mx * mx
    vy = _gaussian_filter(y * y) - my * my
    cxy = _gaussian_filter(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(index.mean())


def diff_picture(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """A grey picture of |a - b| (largest channel difference per pixel), stretched so the largest
    difference is white; and the stretch factor used. Black everywhere when a == b."""
    if a.ndim == 4:  # a video's frames, side by side, on one scale
        a, b = np.concatenate(list(a), axis=1), np.concatenate(list(b), axis=1)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)
    peak = int(diff.max())
    gain = 255.0 / peak if peak else 1.0
    grey = np.clip(np.round(diff * gain), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), gain


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    width: int
    height: int
    psnr_db: float
    ssim: float
    max_abs_diff: int
    mean_abs_diff: float
    differing_pixels: float  # fraction of pixels with any channel different
    diff_path: str | None = None
    diff_gain: float | None = None
    # A video's: each frame's PSNR (the figures above are over all its frames; SSIM their mean).
    frame_psnr_db: tuple[float, ...] = ()

    @property
    def frames(self) -> int:
        return len(self.frame_psnr_db)

    @property
    def identical(self) -> bool:
        return self.max_abs_diff == 0

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["psnr_db"] = None if math.isinf(self.psnr_db) else self.psnr_db  # JSON has no inf
        data["frame_psnr_db"] = [None if math.isinf(v) else v for v in self.frame_psnr_db]
        data["identical"] = self.identical
        return data


def check_diff_path(diff_path: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse a diff picture path that would overwrite one of the images compared."""
    diff = check_png_path(diff_path)
    for source in inputs:
        try:
            same = diff.exists() and os.path.samefile(diff, source)
        except OSError:
            same = False
        if same:
            raise InputError(f"--diff {diff} is the input image {source}; writing the diff there would destroy it. "
                             "Give another --diff path or --no-diff")
    return diff


def compare(a_path: str | os.PathLike, b_path: str | os.PathLike, diff_path: str | os.PathLike | None = None) -> Comparison:
    """Compare two image files of the same size; write the diff picture to ``diff_path`` if given."""
    return compare_pixels(read_image(a_path)[0], read_image(b_path)[0], a_path, b_path, diff_path)


def _size_text(pixels: np.ndarray) -> str:
    """"64x48", or for a video's frames "5 frames of 64x48"."""
    frames = f"{len(pixels)} frames of " if pixels.ndim == 4 else ""
    return f"{frames}{pixels.shape[-2]}x{pixels.shape[-3]}"


def compare_pixels(a: np.ndarray, b: np.ndarray, a_path: str | os.PathLike, b_path: str | os.PathLike,
                   diff_path: str | os.PathLike | None = None) -> Comparison:
    """``compare`` on pixels already read (``read_image``: an image, or a video's frames, compared
    frame by frame); the paths name them in the result."""
    if a.ndim != b.ndim:
        video, image = (a_path, b_path) if a.ndim == 4 else (b_path, a_path)
        raise InputError(f"{video} is a video and {image} an image; compare two images or two video folders")
    if a.shape != b.shape:
        what = "videos of the same size and length" if a.ndim == 4 else "images of the same size"
        raise InputError(f"{a_path} is {_size_text(a)} but {b_path} is {_size_text(b)}; compare {what}")
    gain = None
    if diff_path is not None:
        check_diff_path(diff_path, a_path, b_path)
        picture, gain = diff_picture(a, b)
        write_png(diff_path, picture, {"Software": "sd2mnn compare", "sd2mnn_diff_of": f"{a_path} {b_path}",
                                       "sd2mnn_diff_gain": f"{gain:.3f}"})
    abs_diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    video = a.ndim == 4
    return Comparison(
        a=str(a_path),
        b=str(b_path),
        width=a.shape[-2],
        height=a.shape[-3],
        psnr_db=psnr(a, b),
        ssim=float(np.mean([ssim(x, y) for x, y in zip(a, b)])) if video else ssim(a, b),
        max_abs_diff=int(abs_diff.max()),
        mean_abs_diff=float(abs_diff.mean()),
        differing_pixels=float((abs_diff.max(axis=-1) > 0).mean()),
        diff_path=None if diff_path is None else str(diff_path),
        diff_gain=gain,
        frame_psnr_db=tuple(psnr(x, y) for x, y in zip(a, b)) if video else (),
    )
