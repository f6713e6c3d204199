"""sd2mnn.generation.noise bit for bit against the C++ standard libraries, compiled here.

The C++ below is this test's own program doing what MNN's StableDiffusion::unet() does
(mt19937 seeded with ``seed``, normal_distribution<float>(0, 1), 16384 draws in order). It is
built with g++ (libstdc++) and, where installed, clang++ -stdlib=libc++; the fused-multiply-add
variants need clang++ and a CPU with FMA. A toolchain that is missing skips its cases, saying why;
nothing is installed from here.
"""
from __future__ import annotations

import math
import platform
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from sd2mnn.families import SD15
from sd2mnn.generation.noise import MT19937, fma_f32, glibc_logf, initial_noise, normal_polar

SEEDS = [0, 1, 42, 2**31 - 1, 2**32 - 1]
COUNT = 16384
SD15_LATENT = SD15.recipe.latent_shape  # [1,4,64,64]: 16384 values, the C++ loop count

CPP_SOURCE = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
// argv: mode count seed...; "normal" prints float bits of normal_distribution<float>(0, 1),
// "raw" prints mt19937 outputs. One line per seed: the seed, then the values.
int main(int argc, char** argv) {
    bool normal = std::strcmp(argv[1], "normal") == 0;
    int count = std::atoi(argv[2]);
    for (int a = 3; a < argc; ++a) {
        unsigned long seed = std::strtoul(argv[a], nullptr, 10);
        std::mt19937 rng;
        rng.seed(seed);
        std::normal_distribution<float> dist(0, 1);
        std::printf("%lu", seed);
        for (int i = 0; i < count; ++i) {
            if (normal) {
                float f = dist(rng);
                std::uint32_t u;
                std::memcpy(&u, &f, 4);
                std::printf(" %08x", u);
            } else {
                std::printf(" %lu", (unsigned long)rng());
            }
        }
        std::printf("\n");
    }
}
"""

# (id, stdlib, fma, command): fma=True builds let clang fuse x*x + y*y (as on aarch64).
TOOLCHAINS = [
    ("g++", "libstdc++", False, ["g++", "-O2"]),
    ("clang++-libc++", "libc++", False, ["clang++", "-O2", "-stdlib=libc++"]),
    ("clang++-fma", "libstdc++", True, ["clang++", "-O2", "-mfma", "-ffp-contract=on"]),
    ("clang++-libc++-fma", "libc++", True, ["clang++", "-O2", "-stdlib=libc++", "-mfma", "-ffp-contract=on"]),
]


def _cpu_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def _build(command: list[str], folder: Path, name: str, source: str) -> Path:
    """Compile ``source``; skip (with the reason) when the toolchain is missing or unusable."""
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} not installed")
    if "-mfma" in command and not (platform.machine() in ("x86_64", "AMD64") and _cpu_has_fma()):
        pytest.skip("-mfma build needs an x86-64 CPU with FMA")
    probe = folder / f"{name}_probe.cpp"
    probe.write_text("#include <random>\nint main() { std::mt19937 r; return (int)(r() & 0); }\n")
    result = subprocess.run([*command, "-o", str(folder / f"{name}_probe"), str(probe)], capture_output=True, text=True)
    if result.returncode != 0:
        first = (result.stderr.strip().splitlines() or ["?"])[0]
        hint = " (libc++ needs: apt-get install libc++-dev libc++abi-dev)" if "-stdlib=libc++" in command else ""
        pytest.skip(f"{' '.join(command)} cannot build a <random> program{hint}: {first}")
    src = folder / f"{name}.cpp"
    src.write_text(source)
    exe = folder / name
    subprocess.run([*command, "-o", str(exe), str(src)], check=True)
    return exe


def _run(exe: Path, mode: str, count: int, seeds) -> dict[int, list[str]]:
    out = subprocess.run([str(exe), mode, str(count), *map(str, seeds)], check=True, capture_output=True, text=True)
    return {int(line.split()[0]): line.split()[1:] for line in out.stdout.splitlines()}


@pytest.fixture(scope="module", params=TOOLCHAINS, ids=[t[0] for t in TOOLCHAINS])
def toolchain(request, tmp_path_factory):
    name, stdlib, fma, command = request.param
    exe = _build(command, tmp_path_factory.mktemp("noise_cpp"), name.replace("+", "p"), CPP_SOURCE)
    return stdlib, fma, exe


def test_normal_matches_cpp_bit_for_bit(toolchain):
    stdlib, fma, exe = toolchain
    for seed, hexes in _run(exe, "normal", COUNT, SEEDS).items():
        expected = np.array([int(h, 16) for h in hexes], dtype=np.uint32)
        got = normal_polar(seed, COUNT, stdlib, fma=fma).view(np.uint32)
        mismatches = np.flatnonzero(got != expected)
        assert mismatches.size == 0, f"seed {seed}: {mismatches.size} values differ, first at {mismatches[:5]}"
        # The same as a checksum line a reader can compare by eye.
        assert int(got.astype(np.uint64).sum()) == int(expected.astype(np.uint64).sum())


def test_mt19937_raw_matches_cpp(toolchain):
    _, _, exe = toolchain
    for seed, values in _run(exe, "raw", 2000, SEEDS).items():
        assert MT19937(seed).next_uint32(2000).tolist() == [int(v) for v in values]


def test_initial_noise_mnn_methods_match_cpp(toolchain):
    stdlib, fma, exe = toolchain
    expected = np.array([int(h, 16) for h in _run(exe, "normal", COUNT, [42])[42]], dtype=np.uint32)
    latent = initial_noise(42, SD15_LATENT, method=f"mnn-{stdlib}", fma=fma)
    assert latent.shape == (1, 4, 64, 64) and latent.dtype == np.float32
    np.testing.assert_array_equal(latent.reshape(-1).view(np.uint32), expected)


# --- without a compiler ----------------------------------------------------------------------
def test_mt19937_standard_check_value():
    # C++ [rand.predef]: the 10000th output of a default-constructed mt19937 is 4123659995.
    assert int(MT19937().next_uint32(10000)[-1]) == 4123659995
    assert int(MT19937(5489).next_uint32(10000)[-1]) == 4123659995
    assert MT19937(0).next_uint32(3).tolist() == [2357136044, 2546248239, 3071714933]


def test_mt19937_chunking_does_not_matter():
    whole = MT19937(7).next_uint32(5000)
    rng = MT19937(7)
    parts = np.concatenate([rng.next_uint32(n) for n in (1, 623, 624, 625, 1000, 2127)])
    np.testing.assert_array_equal(parts, whole)


# First values, from the g++ / clang++ -stdlib=libc++ builds above (x86-64, glibc 2.36).
PINNED = {
    ("libstdc++", 0): ["0x400d94ca", "0x3f94dfc3", "0x3f46251d", "0x3ef7b53d"],
    ("libstdc++", 42): ["0x3f9c67eb", "0xbf0457c3", "0x3f5ea076", "0x3f38a942"],
    ("libc++", 0): ["0x3f94dfc3", "0x400d94ca", "0x3ef7b53d", "0x3f46251d"],
    ("libc++", 42): ["0xbf0457c3", "0x3f9c67eb", "0x3f38a942", "0x3f5ea076"],
}


@pytest.mark.parametrize("stdlib,seed", list(PINNED))
def test_pinned_first_values(stdlib, seed):
    got = initial_noise(seed, SD15_LATENT, method=f"mnn-{stdlib}").reshape(-1)[:4].view(np.uint32)
    assert [hex(int(v)) for v in got] == PINNED[(stdlib, seed)]


def test_libcxx_is_libstdcxx_with_pairs_swapped():
    # Same uniforms, same pair; libstdc++ returns y*mult first, libc++ u*mult.
    a = initial_noise(3, SD15_LATENT, method="mnn-libstdc++").reshape(-1, 2)
    b = initial_noise(3, SD15_LATENT, method="mnn-libc++").reshape(-1, 2)
    np.testing.assert_array_equal(a[:, ::-1], b)


def test_fma_changes_some_values_slightly():
    plain, fused = (initial_noise(42, SD15_LATENT, method="mnn-libc++", fma=f) for f in (False, True))
    differ = plain != fused
    assert 0 < differ.sum() < plain.size // 4
    assert np.max(np.abs(plain - fused)) < 1e-5


def test_mnn_default_is_libstdcxx():
    np.testing.assert_array_equal(initial_noise(5, SD15_LATENT, method="mnn"), initial_noise(5, SD15_LATENT, method="mnn-libstdc++"))


def test_numpy_and_torch_methods():
    np.testing.assert_array_equal(
        initial_noise(9, (1, 4, 8, 8), "numpy"),
        np.random.default_rng(9).standard_normal((1, 4, 8, 8), dtype=np.float32),
    )
    torch = pytest.importorskip("torch")
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(9)).numpy()
    got = initial_noise(9, (1, 4, 8, 8), "torch")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_torch_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="PyTorch"):
        initial_noise(0, (2, 2), "torch")


def test_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        initial_noise(-1, SD15_LATENT)
    with pytest.raises(ValueError, match="2\\*\\*32"):
        initial_noise(2**32, SD15_LATENT)
    with pytest.raises(ValueError, match="unknown noise method"):
        initial_noise(0, SD15_LATENT, method="mnn-msvc")
    with pytest.raises(ValueError, match="fma"):
        initial_noise(0, SD15_LATENT, method="numpy", fma=True)
    assert initial_noise(2**32, (2,), "numpy").shape == (2,)  # only mt19937 seeds are 32-bit


def _round_to_f32(q: Fraction) -> np.float32:
    """Exact round-to-nearest-even of a rational to float32 (the reference for fma_f32)."""
    guess = np.float32(float(q))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    def key(c):
        return (abs(Fraction(float(c)) - q), int(c.view(np.uint32)) & 1)
    return min(candidates, key=key)


def test_fma_f32_is_exact():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(2000).astype(np.float32)
    b = rng.standard_normal(2000).astype(np.float32)
    c = (rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 2, 2000)).astype(np.float32)
    # 3 * (1 + 2^-23) is a float32 midpoint; +-2^-70 decides it, and only an exact fma sees that.
    a = np.append(a, np.float32([3, 3, 3]))
    b = np.append(b, np.float32([1 + 2.0**-23] * 3))
    c = np.append(c, np.float32([2.0**-70, -(2.0**-70), 0]))
    got = fma_f32(a, b, c)
    expected = [_round_to_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))) for x, y, z in zip(a, b, c)]
    np.testing.assert_array_equal(got.view(np.uint32), np.array(expected, dtype=np.float32).view(np.uint32))
    assert got[-3:].tolist() == [3 + 2.0**-21, 3 + 2.0**-22, 3 + 2.0**-21]  # up, down, tie to even


LOGF_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char** argv) {
    uint32_t lo = strtoul(argv[1], 0, 0), hi = strtoul(argv[2], 0, 0), step = strtoul(argv[3], 0, 0);
    for (uint64_t u = lo; u < hi; u += step) {
        float x, y;
        uint32_t b = (uint32_t)u;
        memcpy(&x, &b, 4);
        y = logf(x);
        memcpy(&b, &y, 4);
        fwrite(&b, 4, 1, stdout);
    }
    return 0;
}
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the logf emulated is glibc's")
def test_glibc_logf_matches_libm(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src = tmp_path / "logf.c"
    src.write_text(LOGF_SOURCE)
    exe = tmp_path / "logf"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(src), "-lm"], check=True)
    # Every 61st float in [0.5, 1] and every 4099th in [2^-126, 0.5): the polar method's domain.
    for lo, hi, step in [(0x3F000000, 0x3F800001, 61), (0x00800000, 0x3F000000, 4099)]:
        out = subprocess.run([str(exe), hex(lo), hex(hi), str(step)], check=True, capture_output=True).stdout
        expected = np.frombuffer(out, dtype=np.uint32)
        x = np.arange(lo, hi, step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        np.testing.assert_array_equal(glibc_logf(x).view(np.uint32), expected)
        # ... where a correctly rounded log would not do.
        correctly_rounded = np.log(x.astype(np.float64)).astype(np.float32).view(np.uint32)
        if lo == 0x3F000000:
            assert (correctly_rounded != expected).sum() > 0.005 * expected.size
    assert glibc_logf(np.float32(1.0))[()] == 0.0
    assert math.isclose(float(glibc_logf(np.float32(0.5))[()]), math.log(0.5), rel_tol=1e-7)
