"""sd2mnn compare A.png B.png [--diff DIFF.png] [--min-psnr DB]  (or two video folders, frame by frame)"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from sd2mnn.cli._common import add_overwrite_flag, native_stdout_to_stderr, print_json, table
from sd2mnn.core.files import check_replaceable
from sd2mnn.core.images import check_diff_path, compare_pixels, read_image
from sd2mnn.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="PSNR/SSIM of two images (or videos) and a picture of where they differ",
        description="Compare two images of the same size: PSNR, SSIM, largest and mean pixel difference, "
        "and a grey picture of |A - B| stretched so the largest difference is white. Metadata that differs "
        "between the two (sd2mnn generate's prompt, seed, runtime...) is listed. Two video folders "
        "(frame_0000.png, ... as sd2mnn generate and wan_diffusion_demo write them) are compared frame by frame: "
        "the PSNR of each frame and of all, and one diff picture of the frames side by side.",
    )
    parser.add_argument("a", metavar="A", help="first image (PNG), or video folder")
    parser.add_argument("b", metavar="B", help="second image (PNG), or video folder")
    parser.add_argument("--diff", metavar="DIFF.png", help="where to write the diff picture (default: A_vs_B.diff.png beside A)")
    parser.add_argument("--no-diff", action="store_true", help="write no diff picture")
    parser.add_argument("--min-psnr", type=float, metavar="DB", help="exit 1 if PSNR (a video's: its worst frame's) is below this")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON on stdout")
    add_overwrite_flag(parser, "an existing diff picture")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    a, b = Path(args.a), Path(args.b)
    if args.min_psnr is not None and math.isnan(args.min_psnr):
        raise InputError("--min-psnr nan is not a number; give a PSNR in dB, e.g. --min-psnr 40")
    diff = None if args.no_diff else Path(args.diff or a.with_name(f"{a.stem}_vs_{b.stem}.diff.png"))
    if diff is not None:
        check_diff_path(diff, a, b)  # before reading: a bad --diff costs nothing
        check_replaceable(diff, args.overwrite, "the diff picture")
    (pixels_a, meta_a), (pixels_b, meta_b) = read_image(a), read_image(b)
    with native_stdout_to_stderr():  # MNN's PNG encoder prints on import
        result = compare_pixels(pixels_a, pixels_b, a, b, diff)
    # A video passes on its worst frame.
    judged = min(result.frame_psnr_db) if result.frames else result.psnr_db
    failed = args.min_psnr is not None and judged < args.min_psnr
    if args.json:
        print_json({**result.to_dict(), "min_psnr": args.min_psnr, "passed": not failed})
        return 1 if failed else 0
    psnr = "inf (identical)" if math.isinf(result.psnr_db) else f"{result.psnr_db:.2f} dB"
    frames = f", {result.frames} frames" if result.frames else ""
    print(f"{a} vs {b} ({result.width}x{result.height}{frames})")
    if result.frames:
        print("  PSNR per frame: " + "  ".join("inf" if math.isinf(v) else f"{v:.2f}" for v in result.frame_psnr_db))
    print(f"  PSNR {psnr}   SSIM {result.ssim:.5f}   max |diff| {result.max_abs_diff}   "
          f"mean |diff| {result.mean_abs_diff:.4f}   pixels differing {100 * result.differing_pixels:.2f}%")
    rows = [[k, meta_a.get(k, "-"), meta_b.get(k, "-")] for k in sorted(set(meta_a) | set(meta_b))
            if meta_a.get(k) != meta_b.get(k)]
    if rows:
        print(table(["metadata", "A", "B"], rows))
    if diff is not None:
        print(f"  diff picture: {diff} (x{result.diff_gain:.1f})" if not result.identical else f"  diff picture: {diff} (all black)")
    if failed:
        print(f"PSNR {judged:.2f} dB{' (worst frame)' if result.frames else ''} is below --min-psnr {args.min_psnr}")
    return 1 if failed else 0
