"""sd2mnn.schedulers.plms against MNN's C++ (a g++ mirror of step_plms) and against diffusers' PNDM.

The model outputs are a deterministic function of the sample and the timestep, so every
scheduler sees the outputs its own trajectory would get from a UNet:
``eps = sample * 0.9 + noise_i * (t / 1000)``, with ``noise_i`` a fixed pattern per call.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sd2mnn.schedulers.plms import PLMSScheduler, alphas_cumprod, clamp_steps, mnn_timesteps

STEP_COUNTS = [1, 2, 3, 5, 20, 50]
SIZE = 64  # elements in the stand-in latent
F = np.float32


def pattern(call: int) -> np.ndarray:
    """A fixed float32 pattern per UNet call, computed the same way in the C++ mirror."""
    j = np.arange(SIZE, dtype=np.int64)
    return ((j * 7919 + call * 104729) % 1000).astype(np.float32) / F(1000) - F(0.5)


def fake_unet(sample: np.ndarray, t: int, call: int) -> np.ndarray:
    return sample * F(0.9) + pattern(call) * (F(t) / F(1000))


def initial_sample() -> np.ndarray:
    return pattern(12345) * F(4)


def run_mnn(n: int) -> np.ndarray:
    scheduler = PLMSScheduler(n)
    sample = initial_sample()
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(fake_unet(sample, int(t), i), i, sample)
    return sample


def diffusers_pndm(set_alpha_to_one: bool = False):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=set_alpha_to_one,
    )


def run_diffusers(n: int, timesteps=None, set_alpha_to_one: bool = False) -> np.ndarray:
    """diffusers' PNDM loop; ``timesteps`` overrides the list of timesteps fed to ``step()``."""
    torch = pytest.importorskip("torch")
    scheduler = diffusers_pndm(set_alpha_to_one)
    scheduler.set_timesteps(n)
    if timesteps is None:
        timesteps = [int(t) for t in scheduler.timesteps]
    sample = torch.from_numpy(initial_sample())
    for call, t in enumerate(timesteps):
        eps = torch.from_numpy(fake_unet(sample.numpy(), int(t), call))
        sample = scheduler.step(eps, int(t), sample).prev_sample
    return sample.numpy()


# --- the rules read off stable_diffusion.cpp -------------------------------------------------
def test_timesteps_n20_hand_checked():
    # mTimeSteps[i] = 1 + (20 - 1 - i) * (1000 / 20): 1 + 19*50 = 951 down to 1 + 0*50 = 1.
    expected = [951, 901, 851, 801, 751, 701, 651, 601, 551, 501, 451, 401, 351, 301, 251, 201, 151, 101, 51, 1]
    got = mnn_timesteps(20)
    assert got.dtype == np.int32
    assert got.tolist() == expected


@pytest.mark.parametrize("n", range(1, 51))
def test_timesteps_every_count(n):
    # n steps within the 1000 training steps, descending by the same whole stride, ending at
    # steps_offset 1, and no wider apart than 1000 / n (so none is skipped at the top).
    steps = mnn_timesteps(n).tolist()
    assert len(steps) == n and steps[-1] == 1 and steps[0] <= 999
    gaps = {a - b for a, b in zip(steps, steps[1:])}
    assert len(gaps) <= 1 and all(0 < g <= 1000 / n < g + 1 for g in gaps)


def test_timesteps_uneven_counts():
    assert mnn_timesteps(1).tolist() == [1]
    assert mnn_timesteps(3).tolist() == [667, 334, 1]
    assert mnn_timesteps(7).tolist() == [853, 711, 569, 427, 285, 143, 1]  # 1000 // 7 = 142


def test_step_clamp_rule():
    # run(): > 50 -> 50; < 1 -> 10 (not 1).
    assert [clamp_steps(n) for n in (-5, 0, 1, 10, 50, 51, 1000)] == [10, 10, 1, 10, 50, 50, 50]
    for bad in (0, 51, -1):
        with pytest.raises(ValueError, match="1..50"):
            PLMSScheduler(bad)


def test_alphas_cumprod_pinned_values():
    a = alphas_cumprod()
    assert a.dtype == np.float32 and a.shape == (1000,)
    # Bits from the g++ build of scheduler.cpp's loop (test_matches_cpp_mirror checks all 1000).
    assert [hex(int(v)) for v in a[[0, 1, 500, 999]].view(np.uint32)] == [
        "0x3f7fc84b", "0x3f7f9054", "0x3e8d7b76", "0x3b98b3aa",
    ]


def test_last_step_goes_to_alphas_cumprod_0():
    a = alphas_cumprod()
    for n in (1, 3, 20, 50):
        last = PLMSScheduler(n).coefficients(n - 1)
        assert last.prev_timestep == 0 and last.alpha_prod_t_prev == a[0]  # not 1.0


def test_second_call_redoes_the_first_interval():
    s = PLMSScheduler(20)
    first, second, third = s.coefficients(0), s.coefficients(1), s.coefficients(2)
    assert (first.timestep, first.prev_timestep) == (951, 901)
    assert (second.timestep, second.prev_timestep) == (951, 901)
    assert (third.timestep, third.prev_timestep) == (851, 801)  # 901 -> 851 is never stepped
    # N=2: the run ends at alphas_cumprod[1], not [0].
    assert PLMSScheduler(2).coefficients(1).prev_timestep == 1


def test_ets_ring_and_order():
    s = PLMSScheduler(10)
    x = np.zeros(4, np.float32)
    for i in range(10):
        x = s.step(np.full(4, i, np.float32), i, x)
        assert len(s._ets) == min(i if i >= 1 else 1, 4)
    with pytest.raises(IndexError):
        s.step(x, 10, x)
    with pytest.raises(ValueError, match="out of order"):
        PLMSScheduler(10).step(x, 1, x)  # a new run takes a new scheduler


# --- bit for bit against a C++ mirror of scheduler.cpp + step_plms ---------------------------
CPP_MIRROR = r"""
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
// Our own mirror of MNN's scheduler.cpp and StableDiffusion::step_plms, with the MNN tensor
// expressions written as float loops in the same operation order.
typedef std::vector<float> V;
static uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static const int SIZE = 64;
static V pattern(long call) {
    V p(SIZE);
    for (long j = 0; j < SIZE; ++j) p[j] = (float)((j * 7919 + call * 104729) % 1000) / 1000.0f - 0.5f;
    return p;
}
int main() {
    float bs = 0.00085, be = 0.012;
    float start = std::sqrt(bs), end = std::sqrt(be);
    float lstep = (end - start) / (1000 - 1);
    V alphas(1000);
    for (int i = 0; i < 1000; ++i) { float b = start + i * lstep; alphas[i] = 1 - b * b; }
    for (int i = 1; i < 1000; ++i) alphas[i] = alphas[i - 1] * alphas[i];
    for (int i = 0; i < 1000; ++i) std::printf("%08x%c", bits(alphas[i]), i == 999 ? '\n' : ' ');
    const int counts[] = {COUNTS};
    for (int n : counts) {
        std::vector<int> ts(n);
        int step = 1000 / n;
        for (int i = n - 1; i >= 0; i--) ts[i] = 1 + (n - 1 - i) * step;
        V sample = pattern(12345);
        for (auto& s : sample) s = s * 4.0f;
        V sample0;
        std::vector<V> ets;
        for (int index = 0; index < n; ++index) {
            V p = pattern(index), mo(SIZE);
            float tf = (float)ts[index] / 1000.0f;
            for (int j = 0; j < SIZE; ++j) mo[j] = sample[j] * 0.9f + p[j] * tf;
            int timestep = ts[index], prev_timestep = index + 1 < n ? ts[index + 1] : 0;
            if (index != 1) ets.push_back(mo); else { timestep = ts[0]; prev_timestep = ts[1]; }
            int e = ets.size() - 1;
            for (int j = 0; j < SIZE; ++j) {
                if (index == 0) { }
                else if (index == 1) mo[j] = (mo[j] + ets[e][j]) * 0.5f;
                else if (e == 1) mo[j] = (3.0f * ets[e][j] - ets[e-1][j]) * 0.5f;
                else if (e == 2)
                    mo[j] = (23.0f * ets[e][j] - 16.0f * ets[e-1][j] + 5.0f * ets[e-2][j]) * (float)(1.0 / 12.0);
                else
                    mo[j] = (float)(1. / 24.)
                            * (55.0f * ets[e][j] - 59.0f * ets[e-1][j] + 37.0f * ets[e-2][j] - 9.0f * ets[e-3][j]);
            }
            if (index == 0) sample0 = sample;
            if (index == 1) sample = sample0;
            float alpha_prod_t = alphas[timestep], alpha_prod_t_prev = alphas[prev_timestep];
            float beta_prod_t = 1 - alpha_prod_t, beta_prod_t_prev = 1 - alpha_prod_t_prev;
            float sample_coeff = std::sqrt(alpha_prod_t_prev / alpha_prod_t);
            float denom = alpha_prod_t * std::sqrt(beta_prod_t_prev)
                          + std::sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev);
            float eps_coeff = (alpha_prod_t_prev - alpha_prod_t) / denom;
            std::printf("coef %d %d %08x %08x\n", n, index, bits(sample_coeff), bits(eps_coeff));
            for (int j = 0; j < SIZE; ++j) sample[j] = sample_coeff * sample[j] - eps_coeff * mo[j];
        }
        std::printf("traj %d", n);
        for (float s : sample) std::printf(" %08x", bits(s));
        std::printf("\n");
    }
}
"""


# Default flags build the no-contraction case (x86-64); clang with -mfma -ffp-contract=on fuses
# a*b + c as aarch64 builds do. Only the scalars are compared for the fused build: in the mirror
# the tensor loops would be fused too, but in MNN they are separate ops.
MIRROR_BUILDS = {
    "plain": (False, ["g++", "-O2", "-ffp-contract=off"]),
    "fma": (True, ["clang++", "-O2", "-mfma", "-ffp-contract=on"]),
}


def _cpu_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


@pytest.fixture(scope="module")
def mirror_output(tmp_path_factory):
    """build -> (fma, output lines) of the mirror built that way, each built once per module."""
    cache: dict[str, tuple[bool, list[str]]] = {}

    def get(build: str) -> tuple[bool, list[str]]:
        if build not in cache:
            fma, command = MIRROR_BUILDS[build]
            if shutil.which(command[0]) is None:
                pytest.skip(f"{command[0]} not installed: the C++ mirror cannot be built")
            if fma and not (platform.machine() in ("x86_64", "AMD64") and _cpu_has_fma()):
                pytest.skip("the fused build needs an x86-64 CPU with FMA")
            folder = tmp_path_factory.mktemp(f"scheduler_cpp_{build}")
            source = folder / "mirror.cpp"
            source.write_text(CPP_MIRROR.replace("COUNTS", ", ".join(map(str, STEP_COUNTS))))
            subprocess.run([*command, "-o", str(folder / "mirror"), str(source)], check=True)
            run = subprocess.run([str(folder / "mirror")], check=True, capture_output=True, text=True)
            cache[build] = (fma, run.stdout.splitlines())
        return cache[build]

    return get


@pytest.fixture(params=list(MIRROR_BUILDS))
def cpp_mirror(request, mirror_output):
    return mirror_output(request.param)


def _u32(hexes) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=np.uint32)


def test_alphas_cumprod_matches_cpp_mirror(cpp_mirror):
    fma, lines = cpp_mirror
    np.testing.assert_array_equal(alphas_cumprod(fma).view(np.uint32), _u32(lines[0].split()))


def test_step_coefficients_match_cpp_mirror(cpp_mirror):
    fma, lines = cpp_mirror
    rows = [line.split()[1:] for line in lines if line.startswith("coef ")]
    assert len(rows) == sum(STEP_COUNTS)
    for n, index, sample_coeff, eps_coeff in rows:
        c = PLMSScheduler(int(n), fma=fma).coefficients(int(index))
        got = np.array([c.sample_coeff, c.model_output_coeff], dtype=np.float32).view(np.uint32)
        np.testing.assert_array_equal(got, _u32([sample_coeff, eps_coeff]), err_msg=f"N={n} index={index}")


def test_trajectories_match_cpp_mirror(mirror_output):
    _, lines = mirror_output("plain")
    rows = [line.split()[1:] for line in lines if line.startswith("traj ")]
    assert len(rows) == len(STEP_COUNTS)
    for n, *hexes in rows:
        np.testing.assert_array_equal(run_mnn(int(n)).view(np.uint32), _u32(hexes), err_msg=f"N={n}")


def test_fma_build_differs_slightly():
    plain, fused = alphas_cumprod(False), alphas_cumprod(True)
    assert 0 < (plain != fused).sum() < 400  # 206 here
    np.testing.assert_allclose(fused, plain, rtol=1e-6)


# --- against diffusers -----------------------------------------------------------------------
# Where the recipes agree: the timestep values ("leading" spacing + steps_offset 1 gives
# 1 + k*(1000//N)), the PLMS formulas, the final alpha (set_alpha_to_one=False). Fed MNN's
# timesteps through step(), diffusers runs MNN's algorithm: trajectories agree to float32 rounding
# (diffusers' alphas_cumprod comes from torch.linspace, a few ulps off MNN's loop, and it orders
# (a_prev - a_t) * eps / denom differently), not bit for bit.
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_diffusers_fed_mnn_timesteps_reproduces_mnn(n):
    ours = run_mnn(n)
    theirs = run_diffusers(n, timesteps=mnn_timesteps(n).tolist())
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_timestep_values_are_diffusers_leading(n):
    scheduler = diffusers_pndm()
    scheduler.set_timesteps(n)
    assert sorted(set(scheduler.timesteps.tolist()), reverse=True) == mnn_timesteps(n).tolist()


def test_alphas_cumprod_close_to_diffusers_but_not_bitwise():
    ours = alphas_cumprod()
    theirs = diffusers_pndm().alphas_cumprod.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=2e-6)
    assert (theirs.view(np.uint32) != ours.view(np.uint32)).sum() > 900  # 976 of 1000 here
    assert diffusers_pndm().final_alpha_cumprod == diffusers_pndm().alphas_cumprod[0]


# Known difference 1: diffusers' own loop makes N+1 UNet calls, repeating the second timestep;
# MNN makes N. From N=2 on the results differ by far more than rounding.
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_diffusers_own_timesteps_repeat_the_second(n):
    scheduler = diffusers_pndm()
    scheduler.set_timesteps(n)
    mnn = mnn_timesteps(n).tolist()
    expected = mnn if n == 1 else [mnn[0], mnn[1], *mnn[1:]]
    assert scheduler.timesteps.tolist() == expected


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_diffusers_own_loop_differs_from_mnn(n):
    ours, theirs = run_mnn(n), run_diffusers(n)
    if n == 1:
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)
    else:
        assert np.max(np.abs(theirs - ours)) > 1e-3


# Known difference 2: with set_alpha_to_one=True the last step goes to alpha 1.0; MNN uses
# alphas_cumprod[0] (prev_timestep 0).
@pytest.mark.parametrize("n", [1, 5, 20])
def test_set_alpha_to_one_would_differ(n):
    mnn_ts = mnn_timesteps(n).tolist()
    same = run_diffusers(n, timesteps=mnn_ts, set_alpha_to_one=False)
    other = run_diffusers(n, timesteps=mnn_ts, set_alpha_to_one=True)
    assert np.max(np.abs(other - same)) > 1e-4
