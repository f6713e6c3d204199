"""Initial latent noise, bit for bit as MNN's C++ diffusion runtime draws it.

``StableDiffusion::unet()`` (MNN ``transformers/diffusion/engine/src/stable_diffusion.cpp``)::

    std::mt19937 rng;
    rng.seed(seed);
    std::normal_distribution<float> normal(0, 1);
    for (int i = 0; i < 16384; i++) mInitNoise[i] = normal(rng);   // then memcpy into [1,4,64,64]

``DiffusionSD35::run()`` (diffusion_sd35.cpp, SD3.5) draws the same way, ``std::mt19937 rng(seed)``
then 1 * 16 * 128 * 128 values one after another into an NCHW vector: the same stream, longer
(its first 16384 values are SD1.5's latent for the seed). ``initial_noise(seed, shape)`` draws
any shape so.

Both standard libraries implement ``normal_distribution`` with Marsaglia's polar method, but
not identically, so the same seed gives different latents on different platforms:

===================  ============================================  =================================
                     libstdc++ (GCC; MNN's Linux builds)           libc++ (Android NDK, iOS, macOS)
===================  ============================================  =================================
uniform in [0, 1)    ``generate_canonical<float, 24>``: one         ``generate_canonical<float, 24>``:
                     32-bit draw, ``float(x) / 2^32``; a result     one draw, ``float(x) / 2^32``,
                     that rounds to 1.0 becomes ``1 - 2^-24``       1.0 is returned as it is
point in the square  ``x = 2.0f * u - 1.0`` (double subtraction,    ``uniform_real_distribution(-1,1)``
                     one rounding to float)                         ``2.0f * u + -1.0f``: same value
returned first       ``y * mult`` (the second coordinate)           ``u * mult`` (the first)
kept for next call   ``x * mult``                                   ``v * mult``
===================  ============================================  =================================

Apart from the clamp (a draw of 2^32 - 128 or more, about once in 3e7) the two latents hold the
same values with each pair swapped. The libstdc++ column is GCC 12's header; a libstdc++ that
implements C++26's new ``generate_canonical`` (P0952R2) may differ, which the g++ test would show.

Everything else is float arithmetic in both: ``r2 = x*x + y*y``, accepted when ``0 < r2 <= 1``,
``mult = sqrt(-2 * log(r2) / r2)``, each value then ``* 1.0f + 0.0f``. ``log`` is the C library's
``logf``: glibc's (and, we believe, Android bionic's: both carry Arm's optimized-routines code)
is not correctly rounded (0.82 ulp; it differs from the correctly rounded log for 1.3% of the
floats in [0.5, 1]), so it is emulated here operation for operation. Apple's libm ``logf`` is
not emulated.

Compiler contraction matters too. Where ``x*x + y*y`` is fused into ``fma(x, x, y*y)`` the
values change: clang does it by default on FMA targets (aarch64: Android NDK, iOS, Apple
silicon; x86-64 with ``-mfma``). GCC 12 with ``-mfma`` on x86-64 was seen not to fuse it.
``fma=True`` reproduces a fusing build; the default ``fma=False`` an x86-64 build with default
flags.

The test suite compiles small C++ programs with g++ (libstdc++) and clang++ -stdlib=libc++ (with
and without -mfma) and compares every value bit for bit.
"""
from __future__ import annotations

import math

import numpy as np

METHODS = ("mnn", "mnn-libstdc++", "mnn-libc++", "numpy", "torch")

_U32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# std::mt19937 (C++ [rand.eng.mers], the same in every standard library)
# ---------------------------------------------------------------------------------------------
class MT19937:
    """``std::mt19937`` with ``seed(value)``; ``next_uint32(n)`` returns the next n outputs."""

    N, M = 624, 397
    MATRIX_A, UPPER, LOWER = 0x9908B0DF, 0x80000000, 0x7FFFFFFF

    def __init__(self, seed: int = 5489):
        # seed(): x[0] = seed mod 2^32; x[i] = 1812433253 * (x[i-1] ^ (x[i-1] >> 30)) + i mod 2^32.
        state = [int(seed) & _U32]
        for i in range(1, self.N):
            prev = state[-1]
            state.append((1812433253 * (prev ^ (prev >> 30)) + i) & _U32)
        self._mt = np.array(state, dtype=np.uint32)
        self._index = self.N  # the first output twists

    def _twist(self) -> None:
        mt, n, m = self._mt, self.N, self.M

        def update(lo: int, hi: int, nxt: np.ndarray, far: np.ndarray) -> None:
            y = (mt[lo:hi] & np.uint32(self.UPPER)) | (nxt & np.uint32(self.LOWER))
            mt[lo:hi] = far ^ (y >> np.uint32(1)) ^ ((y & np.uint32(1)) * np.uint32(self.MATRIX_A))

        # new[i] = f(old[i], old[i+1], new-or-old[i+M mod N]); slices of at most N-M elements
        # see only values already final for this round.
        update(0, n - m, mt[1 : n - m + 1], mt[m:n])
        update(n - m, 2 * (n - m), mt[n - m + 1 : 2 * (n - m) + 1], mt[0 : n - m])
        update(2 * (n - m), n - 1, mt[2 * (n - m) + 1 : n], mt[n - m : m - 1])
        update(n - 1, n, mt[0:1], mt[m - 1 : m])
        self._index = 0

    def next_uint32(self, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.uint32)
        filled = 0
        while filled < count:
            if self._index >= self.N:
                self._twist()
            take = min(count - filled, self.N - self._index)
            out[filled : filled + take] = self._mt[self._index : self._index + take]
            self._index += take
            filled += take
        # Tempering.
        y = out
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        return y


# ---------------------------------------------------------------------------------------------
# Exact float helpers
# ---------------------------------------------------------------------------------------------
def fma_f32(a, b, c) -> np.ndarray:
    """``fmaf(a, b, c)``: a*b + c rounded once to float32 (a, b, c float32; elementwise).

    a*b is exact in float64 (24 + 24 bits); TwoSum gives s + e == a*b + c exactly; rounding s to
    float32 is right unless s sits exactly on a float32 midpoint, where e breaks the tie.
    """
    a, b, c = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (a, b, c))
    p = a * b
    s = p + c
    bp = s - p
    e = (p - (s - bp)) + (c - bp)  # Knuth TwoSum: s + e == p + c exactly
    r = s.astype(np.float32)
    # Only where s is a float32 midpoint and e points away from r is the other neighbour right.
    neighbour = np.nextafter(r, np.where(e > 0, np.float32(np.inf), np.float32(-np.inf)))
    n64 = neighbour.astype(np.float64)
    midpoint = (e != 0) & ((r - s) * e < 0) & (np.abs(s - r) == np.abs(n64 - s))
    return np.where(midpoint, neighbour, r)


# ---------------------------------------------------------------------------------------------
# logf as glibc >= 2.28 implements it (sysdeps/ieee754/flt-32/e_logf.c, Arm optimized-routines)
# ---------------------------------------------------------------------------------------------
# e_logf_data.c: for 16 subintervals of [OFF, 2*OFF], 1/c and log(c); ln2; log1p poly A[0..2].
_LOGF_INVC = np.array([float.fromhex(h) for h in (
    "0x1.661ec79f8f3bep+0", "0x1.571ed4aaf883dp+0", "0x1.49539f0f010bp+0", "0x1.3c995b0b80385p+0",
    "0x1.30d190c8864a5p+0", "0x1.25e227b0b8eap+0", "0x1.1bb4a4a1a343fp+0", "0x1.12358f08ae5bap+0",
    "0x1.0953f419900a7p+0", "0x1p+0", "0x1.e608cfd9a47acp-1", "0x1.ca4b31f026aap-1",
    "0x1.b2036576afce6p-1", "0x1.9c2d163a1aa2dp-1", "0x1.886e6037841edp-1", "0x1.767dcf5534862p-1",
)])
_LOGF_LOGC = np.array([float.fromhex(h) for h in (
    "-0x1.57bf7808caadep-2", "-0x1.2bef0a7c06ddbp-2", "-0x1.01eae7f513a67p-2", "-0x1.b31d8a68224e9p-3",
    "-0x1.6574f0ac07758p-3", "-0x1.1aa2bc79c81p-3", "-0x1.a4e76ce8c0e5ep-4", "-0x1.1973c5a611cccp-4",
    "-0x1.252f438e10c1ep-5", "0x0p+0", "0x1.aa5aa5df25984p-5", "0x1.c5e53aa362eb4p-4",
    "0x1.526e57720db08p-3", "0x1.bc2860d22477p-3", "0x1.1058bc8a07ee1p-2", "0x1.4043057b6ee09p-2",
)])
_LOGF_LN2 = float.fromhex("0x1.62e42fefa39efp-1")
_LOGF_A = tuple(float.fromhex(h) for h in ("-0x1.00ea348b88334p-2", "0x1.5575b0be00b6ap-2", "-0x1.ffffef20a4123p-2"))
_LOGF_OFF = 0x3F330000


def glibc_logf(x) -> np.ndarray:
    """glibc's ``logf`` for normal positive float32 x, bit for bit, vectorized.

    Binary64 operations in the C's order. The build that fuses ``a*b + c`` (x86-64
    ``__logf_fma``, aarch64) gives the same float32 for every normal x < 1, checked exhaustively
    with an exact fma (all of 0 < r2 <= 1, the polar method's domain), so one path serves both.
    """
    shape = np.shape(x)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if not np.all((x >= np.finfo(np.float32).tiny) & (x < np.inf)):
        raise ValueError("glibc_logf is emulated for normal positive finite inputs only")
    ix = x.view(np.uint32)
    # x = 2^k z with z in [OFF, 2*OFF]; i picks the subinterval whose centre c is tabulated.
    tmp = ix - np.uint32(_LOGF_OFF)
    i = ((tmp >> np.uint32(23 - 4)) % np.uint32(16)).astype(np.intp)
    k = tmp.view(np.int32) >> np.int32(23)  # arithmetic shift
    iz = ix - (tmp & np.uint32(0x1FF << 23))
    z = iz.view(np.float32).astype(np.float64)
    invc, logc = _LOGF_INVC[i], _LOGF_LOGC[i]
    a0, a1, a2 = _LOGF_A
    # log(x) = log1p(z/c - 1) + log(c) + k*Ln2
    r = z * invc - 1.0
    y0 = logc + k.astype(np.float64) * _LOGF_LN2
    r2 = r * r
    y = a1 * r + a2
    y = a0 * r2 + y
    y = y * r2 + (y0 + r)
    out = y.astype(np.float32)
    out[ix == np.uint32(0x3F800000)] = 0.0  # the explicit "return 0" for x == 1
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# std::normal_distribution<float>(0, 1) on std::mt19937
# ---------------------------------------------------------------------------------------------
def normal_polar(seed: int, count: int, stdlib: str, fma: bool = False) -> np.ndarray:
    """The first ``count`` values of ``normal_distribution<float>(0,1)`` on ``mt19937(seed)``.

    ``stdlib`` is "libstdc++" or "libc++"; ``fma`` whether the C++ was compiled to fuse
    ``x*x + y*y`` (see the module docstring).
    """
    if stdlib not in ("libstdc++", "libc++"):
        raise ValueError(f"stdlib must be 'libstdc++' or 'libc++', got {stdlib!r}")
    rng = MT19937(seed)
    pairs_needed = (count + 1) // 2
    chunks: list[np.ndarray] = []
    have = 0
    while have < pairs_needed:
        # About pi/4 of the pairs are accepted; extra draws past the last needed pair are harmless.
        attempts = int((pairs_needed - have) * 1.3) + 16
        draws = rng.next_uint32(2 * attempts)
        # generate_canonical<float, 24>: float(x) (one rounding: via the exact float64) / 2^32.
        u = draws.astype(np.float64).astype(np.float32) / np.float32(2.0**32)
        if stdlib == "libstdc++":
            u = np.where(u >= np.float32(1), np.nextafter(np.float32(1), np.float32(0)), u)
        # 2u is exact, so "2.0f*u - 1.0" (libstdc++, via double) and "2.0f*u + -1.0f" (libc++)
        # both round the exact 2u - 1 once to float.
        v = np.float32(2) * u - np.float32(1)
        first, second = v[0::2], v[1::2]
        if fma:
            r2 = fma_f32(first, first, second * second)
        else:
            r2 = first * first + second * second
        accepted = (r2 <= np.float32(1)) & (r2 != np.float32(0))  # reject r2 > 1 || r2 == 0
        first, second, r2 = first[accepted], second[accepted], r2[accepted]
        mult = np.sqrt(np.float32(-2) * glibc_logf(r2) / r2)
        if stdlib == "libstdc++":
            pair = (second * mult, first * mult)  # returns y*mult, saves x*mult
        else:
            pair = (first * mult, second * mult)  # returns u*mult, saves v*mult
        chunks.append(np.stack(pair, axis=1).reshape(-1))
        have += len(first)
    values = np.concatenate(chunks)[:count]
    # "__ret * stddev + mean" with stddev 1, mean 0 (turns a -0.0 into +0.0, as the C++ does).
    return values * np.float32(1) + np.float32(0)


def initial_noise(seed: int, shape: tuple[int, ...], method: str = "mnn", *, fma: bool = False) -> np.ndarray:
    """The initial latent, float32, C order.

    ``method``:
      * ``"mnn-libstdc++"``: MNN's runtime built with GCC's libstdc++ (Linux).
      * ``"mnn-libc++"``: MNN's runtime built with LLVM's libc++ (Android NDK, iOS, macOS).
      * ``"mnn"``: ``"mnn-libstdc++"``. The default is the build sd2mnn can run and check
        against: MNN's Linux x86-64 ``diffusion_demo``, where the tests compile the same C++.
        For a latent from a phone or Mac build use ``"mnn-libc++"``, and ``fma=True`` for an
        aarch64 build (see the module docstring; Apple's own ``logf`` is not emulated).
      * ``"numpy"``: ``np.random.default_rng(seed).standard_normal(shape, dtype=float32)``.
      * ``"torch"``: ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``.

    MNN draws its values one after another into the NCHW latent, so the first 16384 values of a
    ``(1, 4, 64, 64)`` latent are the C++ runtime's; other shapes continue the same stream.
    ``seed`` must be >= 0 (MNN takes a negative seed to mean ``std::random_device``); the mnn
    methods take seeds below 2**32 (MNN's own command line takes an ``int``: < 2**31).
    """
    shape = tuple(int(d) for d in shape)
    count = math.prod(shape)
    if method not in METHODS:
        raise ValueError(f"unknown noise method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    seed = int(seed)
    if method.startswith("mnn"):
        if seed > _U32:
            raise ValueError(f"seed must be below 2**32 for {method!r} (std::mt19937 seeds are 32-bit), got {seed}")
        stdlib = "libc++" if method == "mnn-libc++" else "libstdc++"
        return normal_polar(seed, count, stdlib, fma=fma).reshape(shape)
    if fma:
        raise ValueError(f"fma applies to the mnn methods only, not {method!r}")
    if method == "numpy":
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    try:
        import torch
    except ImportError as exc:  # torch is an optional extra
        raise ImportError("noise method 'torch' needs PyTorch: pip install 'sd2mnn[export]'") from exc
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()
