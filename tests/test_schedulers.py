"""sd2mnn.schedulers: one interface over the runtimes' schedulers, and the flow-match Euler of
MNN's SD3.5 runtime against a g++ mirror of diffusion_sd35.cpp and against diffusers."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from sd2mnn import schedulers
from sd2mnn.families import FAMILIES
from sd2mnn.schedulers.flow_match import FlowMatchEulerScheduler, sd35_timesteps

STEP_COUNTS = (1, 2, 3, 4, 20, 28, 50)
SIZE = 64

# DiffusionSD35::run()'s timestep loop and step_flow_match(), copied line for line (the tensor
# ops as float loops: "sample + model_output * _Const(dt)" is a multiply, then an add).
CPP_MIRROR = r"""
#include <cstdio>
#include <cstring>
#include <vector>
static unsigned bits(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
int main() {
    int counts[] = {COUNTS};
    for (int iterNum : counts) {
        std::vector<int> mTimeSteps;
        mTimeSteps.resize(iterNum);
        if (iterNum == 1) {
            mTimeSteps[0] = 1000.0f;
        } else {
            float shift = 3.0f;
            float start = 1.0f;
            float end = 1.0f / 1000.0f;
            for (int i = 0; i < iterNum; i++) {
                float t_linear = start + i * (end - start) / (iterNum - 1);
                float t_shifted = (shift * t_linear) / (1.0f + (shift - 1.0f) * t_linear);
                mTimeSteps[i] = t_shifted * 1000.0f;
            }
        }
        std::printf("steps %d", iterNum);
        for (int t : mTimeSteps) std::printf(" %d", t);
        std::printf("\n");
        float sample[SIZE], v[SIZE];
        for (int j = 0; j < SIZE; ++j) sample[j] = (j - 31.5f) / 8.0f;
        for (int index = 0; index < iterNum; ++index) {
            for (int j = 0; j < SIZE; ++j) v[j] = (float)((j * 7 + index * 13) % 17) / 5.0f - 1.5f;
            float sigma = mTimeSteps[index] / 1000.0f;
            float sigma_next = (index + 1 < mTimeSteps.size()) ? (mTimeSteps[index + 1] / 1000.0f) : 0.0f;
            float dt = sigma_next - sigma;
            for (int j = 0; j < SIZE; ++j) { float m = v[j] * dt; sample[j] = sample[j] + m; }
        }
        std::printf("traj %d", iterNum);
        for (float s : sample) std::printf(" %08x", bits(s));
        std::printf("\n");
    }
}
"""


@pytest.fixture(scope="module")
def cpp_lines(tmp_path_factory) -> list[str]:
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed: the C++ mirror cannot be built")
    folder = tmp_path_factory.mktemp("flow_match_cpp")
    source = folder / "mirror.cpp"
    source.write_text(CPP_MIRROR.replace("COUNTS", ", ".join(map(str, STEP_COUNTS))).replace("SIZE", str(SIZE)))
    subprocess.run(["g++", "-O2", "-ffp-contract=off", "-o", str(folder / "mirror"), str(source)], check=True)
    return subprocess.run([str(folder / "mirror")], check=True, capture_output=True, text=True).stdout.splitlines()


def _inputs(index: int) -> np.ndarray:
    j = np.arange(SIZE)
    return (((j * 7 + index * 13) % 17).astype(np.float32) / np.float32(5.0) - np.float32(1.5)).astype(np.float32)


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_flow_match_matches_cpp_mirror(cpp_lines, n):
    steps = next(line.split()[2:] for line in cpp_lines if line.startswith(f"steps {n} "))
    traj = next(line.split()[2:] for line in cpp_lines if line.startswith(f"traj {n} "))
    scheduler = FlowMatchEulerScheduler(n)
    assert scheduler.timesteps.tolist() == [int(t) for t in steps]
    sample = ((np.arange(SIZE) - np.float32(31.5)) / np.float32(8.0)).astype(np.float32)
    for i in range(n):
        sample = scheduler.step(_inputs(i), i, sample)
    np.testing.assert_array_equal(sample.view(np.uint32), np.array([int(h, 16) for h in traj], dtype=np.uint32))


def _shift(t, shift=3.0):
    return shift * t / (1 + (shift - 1) * t)


@pytest.mark.parametrize("n", (2, 4, 20, 28))
def test_flow_match_sigmas_against_the_formula_and_diffusers(n):
    ours = FlowMatchEulerScheduler(n)
    # MNN: shift(linspace(1, 1/1000, N)), times 1000 truncated to an integer, then / 1000; 0 last.
    expected = np.floor(1000 * _shift(np.linspace(1, 0.001, n))) / 1000
    np.testing.assert_allclose(ours.sigmas[:-1], expected, atol=1.001e-3)
    assert ours.sigmas[0] == 1 and ours.sigmas[-1] == 0 and ours.timesteps.dtype == np.int32
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(n)
    theirs = reference.sigmas.numpy()
    # Both start at 1 and end at 0 ...
    assert theirs[0] == pytest.approx(1.0) and theirs[-1] == 0
    # ... but diffusers shifts its end twice (sigma_min is already shifted) and keeps fractions.
    np.testing.assert_allclose(theirs[:-1], _shift(np.linspace(1, _shift(0.001), n)), rtol=1e-5)
    assert theirs[-2] == pytest.approx(0.00893, abs=1e-4) and ours.sigmas[-2] == pytest.approx(0.002)
    # The same step rule: x + v * (sigma_next - sigma).
    x, v = np.ones(4, np.float32), np.full(4, 0.5, np.float32)
    import torch

    out = reference.step(torch.from_numpy(v), reference.timesteps[0], torch.from_numpy(x)).prev_sample.numpy()
    np.testing.assert_allclose(out, x + v * (theirs[1] - theirs[0]), rtol=1e-6)


def test_flow_match_refuses_step_counts_outside_the_runtime():
    for bad in (0, 51, 2.5):
        with pytest.raises(ValueError):
            sd35_timesteps(bad)


def test_each_family_recipe_names_a_scheduler_with_the_interface():
    for family in FAMILIES.values():
        scheduler = schedulers.make(family.recipe.scheduler, 4)
        assert len(scheduler.timesteps) == 4
        sample = np.zeros((1, 4, 2, 2), np.float32)
        for i in range(4):
            sample = scheduler.step(np.ones_like(sample), i, sample)
        assert sample.shape == (1, 4, 2, 2)
    flow = schedulers.make("flow_match_euler", 4)
    sample = np.zeros(3, np.float32)
    for i in range(4):
        sample = flow.step(np.ones(3, np.float32), i, sample)
    np.testing.assert_allclose(sample, -1.0)  # sum of dt from sigma 1 to 0
