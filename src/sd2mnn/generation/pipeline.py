"""Text to image from an MNN bundle, step for step as MNN's C++ runtime does it; or from the ONNX
pipeline on ONNX Runtime with the same recipe, so the two can be compared.

One engine for every family (sd2mnn.families): tokenize -> text encoders -> noise -> denoiser
steps with guidance -> VAE decoder -> PNG. Read against MNN 3.6.1's runtimes in
``transformers/diffusion/engine/src``: ``stable_diffusion.cpp`` (SD1.5, Taiyi: ``run()`` ->
``text_encoder()`` -> ``unet()`` -> ``vae_decoder()`` -> ``imwrite()``) and ``diffusion_sd35.cpp``
(SD3.5: ``encode_prompt()`` -> ``run()`` -> ``vae_decoder()``). What differs between them (how
the text encoders' outputs condition the denoiser, its inputs) is in sd2mnn.recipes; the
family's Recipe names the scheduler, guidance and latent scaling. tests/test_runtime_recipe.py and
tests/test_sd35_generate.py hold the choices here against the C++ lines they mirror. The pieces
live where they are tested: tokenization/ (ids), noise.py (std::mt19937 latents), schedulers/,
core/images.py (the PNG file).

    import sd2mnn
    image = sd2mnn.Pipeline("mnn/").generate("a cat", steps=20, seed=42)    # a PIL image
    ref = sd2mnn.Pipeline.from_onnx("onnx/").generate("a cat", steps=20, seed=42)
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from sd2mnn import families, recipes, schedulers
from sd2mnn._version import __version__
from sd2mnn.core.bundle import check_for_use
from sd2mnn.core.contract import check_same_sizes, check_vocabulary, runtime_input_shapes
from sd2mnn.core.files import confined, read_user_text
from sd2mnn.core.layout import MANIFEST_NAME, MTOK_NAME, bundle_mtok, bundle_mtoks
from sd2mnn.core.manifest import FileRecord, read_manifest
from sd2mnn.core.runtime import MnnModel, OrtModel, RuntimeConfig, check_mnn_files, mnn_runtime_manager
from sd2mnn.errors import InputError, MissingExtraError
from sd2mnn.families import Family
from sd2mnn.generation.noise import METHODS, initial_noise
from sd2mnn.schedulers import MAX_STEPS, MIN_STEPS, clamp_steps
from sd2mnn.tokenization.diffusers_scheme import DEFAULT_SCHEME
from sd2mnn.tokenization.prompt_ids import PromptIds

# The runtime's guidance, latent scale and the like are each family's (Family.recipe).
MAX_GUIDANCE = 100.0  # published pipelines use 1..20; beyond this only blank or noise images come out
DEFAULT_STEPS = 20
RUNTIMES = ("mnn", "onnxruntime")
TOKENIZERS = ("runtime", "hf")  # whose ids feed the text encoder (GenerationParams.tokenizer)
# Whose scheduler (GenerationParams.schedule): MNN's runtime's, or diffusers' pipeline's (the
# flow-match families only: Recipe.diffusers_scheduler).
SCHEDULES = ("runtime", "diffusers")


# ---------------------------------------------------------------------------------------------
# The runtime's arithmetic, one function per C++ expression
# ---------------------------------------------------------------------------------------------
def guide(noise_pred: np.ndarray, scale: float) -> np.ndarray:
    """``_Split(noise_pred, {2}, 0)`` (row 0 unconditional, row 1 text), then
    ``scalevar * (noise_pred_text - noise_pred_uncond) + noise_pred_uncond`` in float32
    (SD3.5's ``uncond + (text - uncond) * scale`` is the same float operations)."""
    uncond, text = noise_pred[0:1], noise_pred[1:2]
    return np.float32(scale) * (text - uncond) + uncond


def scale_latents(latent: np.ndarray, scale: float, shift: float = 0.0) -> np.ndarray:
    """``latent * _Const(1 / 0.18215)``: a multiply by the float nearest 1/0.18215, not a divide;
    SD3.5 then adds its shift, ``+ _Const(0.0609f)``."""
    scaled = latent * np.float32(scale)
    return scaled + np.float32(shift) if shift else scaled


def decoded_to_pixels(sample: np.ndarray) -> np.ndarray:
    """The VAE output [1, 3, H, W] -> uint8 RGB [H, W, 3], as ``vae_decoder()`` does it:

    ``_Relu6(image * 0.5 + 0.5, 0, 1)``, ``_Squeeze(_Transpose(image, {0, 2, 3, 1}))``,
    ``_Cast<uint8>(_Round(image * 255.0))``. MNN's Round is C's ``roundf`` (halves away from
    zero, not numpy's halves to even); its x86 Relu6 kernel turns NaN into 1.
    """
    image = np.asarray(sample, dtype=np.float32) * np.float32(0.5) + np.float32(0.5)
    image = np.where(np.isnan(image), np.float32(1), np.clip(image, np.float32(0), np.float32(1)))
    image = np.squeeze(np.transpose(image, (0, 2, 3, 1)))
    scaled = image * np.float32(255.0)
    floor = np.floor(scaled)
    return (floor + (scaled - floor >= np.float32(0.5))).astype(np.uint8)  # roundf; x - floor(x) is exact


def decoded_to_frames(sample: np.ndarray) -> np.ndarray:
    """A video VAE's NCTHW output [1, 3, F, H, W] -> uint8 RGB [F, H, W, 3]: each frame sliced
    out and written as an image (wan_diffusion.cpp saveVideoFrames, saveFrame)."""
    return np.stack([decoded_to_pixels(sample[:, :, i]) for i in range(sample.shape[2])])


def mnn_runtime_config(
    backend: str = "CPU",
    threads: int = 4,
    precision: str = "low",
    memory_mode: int = 1,
    cache_file: str | None = None,
    *,
    family: Family,
) -> RuntimeConfig:
    """The runtime settings ``family``'s MNN runtime loads its models with (its recipe's
    ``runtime_config``): CPU with 4 threads, precision and memory Low, and what the family's
    runtime adds per backend and ``memory_mode``. MNN picks kernels by thread count, so other
    thread counts can move a few pixels. A ``cache_file`` keeps OpenCL's tuning between runs
    (load(): ".tempcache")."""
    check_memory_mode(memory_mode)
    return recipes.steps_for(family).runtime_config(backend, threads, precision, memory_mode, cache_file)


def check_memory_mode(memory_mode) -> None:
    if memory_mode not in recipes.MEMORY_MODES:
        raise InputError(f"memory mode must be 0, 1 or 2 (diffusion_demo's memory_mode), got {memory_mode}")


# ---------------------------------------------------------------------------------------------
# What to draw
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GenerationParams:
    """One request. The defaults are MNN's runtime's; ``divergences()`` lists what departs from it."""

    prompt: str
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    seed: int = 0
    guidance: float | None = None  # None: the family's (SD1.5 7.5, SD3.5 5.0)
    noise: str = "mnn"  # how latents are drawn from the seed (noise.py)
    latents: np.ndarray | None = None  # given initial latents: seed and noise are then unused
    latents_source: str | None = None  # where they came from, for the metadata
    # "runtime": the ids MNN's runtime feeds (from tokenizer.mtok); "hf": Hugging Face's, as in
    # diffusers, to see the image diffusers' conditioning gives on the same models.
    tokenizer: str = "runtime"
    # "runtime": MNN's scheduler; "diffusers": diffusers' pipeline's (SD3.5's float timesteps,
    # Wan's UniPC).
    schedule: str = "runtime"
    # The image size (a video's: and frames) asked for; None: the models' (fixed at export).
    height: int | None = None
    width: int | None = None
    frames: int | None = None

    def guidance_for(self, family: Family) -> float:
        return family.recipe.guidance if self.guidance is None else self.guidance

    def validate(self, family: Family, latent_shape: tuple[int, ...] | None = None) -> None:
        """``latent_shape``: the denoiser's latents (MNN's SD1.5 runtime: [1,4,64,64]), for given
        latents; None before the models are loaded (any shape)."""
        if not isinstance(self.prompt, str):
            raise InputError(f"the prompt must be text, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise InputError('the prompt is empty; say what to draw, e.g. "a photo of a cat"')
        for name, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"the {name} is not valid text (undecodable bytes); pass it as UTF-8") from None
        if not _whole(self.steps) or not MIN_STEPS <= self.steps <= MAX_STEPS:
            if family.recipe.scheduler != "plms":  # diffusion_sd35.cpp takes any count; 50 is sd2mnn's bound
                mnn = " (sd2mnn's range for the flow-matching families; SD3.5 Medium draws well in 28-40)"
            else:
                mnn = f" (MNN's runtime would quietly use {clamp_steps(self.steps)})" if _whole(self.steps) else ""
            raise InputError(f"steps must be a whole number from {MIN_STEPS} to {MAX_STEPS}, got {self.steps!r}{mnn}")
        guidance = self.guidance_for(family)
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
            raise InputError(f"guidance must be a finite number, got {guidance!r}")
        if not 0 <= guidance <= MAX_GUIDANCE:
            raise InputError(f"guidance must be from 0 to {MAX_GUIDANCE:g}, got {guidance:g} (MNN's runtime uses "
                             f"{family.recipe.guidance:g}; far larger values overflow the latents into a blank image)")
        if self.tokenizer not in TOKENIZERS:
            raise InputError(f"unknown tokenizer {self.tokenizer!r}; choose {' or '.join(TOKENIZERS)}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; choose {' or '.join(SCHEDULES)}")
        if self.schedule == "diffusers" and not family.recipe.diffusers_scheduler:
            raise InputError(f"schedule 'diffusers' is SD3.5's and Wan's; {family.name} runs its runtime's schedule "
                             f"only ({family.recipe.scheduler})")
        for name, value, unit in (("height", self.height, " of pixels"), ("width", self.width, " of pixels"),
                                  ("frames", self.frames, "")):
            if value is not None and (not _whole(value) or value <= 0):
                raise InputError(f"{name} must be a whole number{unit} above 0, got {value!r}")
        if self.frames is not None and not family.recipe.frames:
            raise InputError(f"frames {self.frames}: {family.name} draws images; leave --frames out")
        if self.latents is not None:
            check_latents(self.latents, self.latents_source or "the given latents", latent_shape)
            return
        if self.noise not in METHODS:
            raise InputError(f"unknown noise {self.noise!r}; choose one of {', '.join(METHODS)}")
        if self.noise == "torch":
            try:
                import torch  # noqa: F401  (here, not after minutes of loading)
            except ImportError:
                raise MissingExtraError("noise 'torch' needs PyTorch, which is not installed: pip install "
                                        "'sd2mnn[export]', or use --noise mnn (MNN's runtime) or numpy") from None
        limit = 2**32 if self.noise.startswith("mnn") else 2**63  # std::mt19937 seeds are 32-bit
        if not _whole(self.seed) or not 0 <= self.seed < limit:
            raise InputError(f"seed must be a whole number from 0 to {limit - 1}, got {self.seed!r}"
                             " (MNN's runtime takes a negative seed to mean a random one)")

    def divergences(self, family: Family) -> list[str]:
        """Why the image will not be the one MNN's C++ runtime draws for this prompt and seed."""
        out = []
        if self.negative_prompt:
            out.append('a negative prompt (MNN\'s runtime always uses "" as the unconditional prompt)')
        if self.guidance_for(family) != family.recipe.guidance:
            out.append(f"guidance {self.guidance_for(family):g} (MNN's runtime uses {family.recipe.guidance:g})")
        if self.tokenizer == "hf":
            out.append("Hugging Face's token ids (MNN's runtime feeds the ids of tokenizer.mtok: --tokenizer runtime)")
        if self.schedule == "diffusers":
            out.append(f"diffusers' scheduler ({family.recipe.diffusers_departure}: --schedule runtime)")
        if self.latents is not None:
            out.append("given latents (the same image only if they are the ones MNN's runtime draws)")
        elif not self.noise.startswith("mnn"):
            out.append(f"{self.noise} noise (MNN's runtime draws std::mt19937 noise: --noise mnn)")
        elif self.seed >= 2**31:
            out.append(f"seed {self.seed} (diffusion_demo reads its seed with atoi: below 2**31)")
        return out

    def initial_latents(self, shape: tuple[int, ...]) -> np.ndarray:
        """Given latents, or noise of ``shape`` (the denoiser's: Pipeline.latent_shape)."""
        if self.latents is not None:
            return np.ascontiguousarray(self.latents, dtype=np.float32)
        return initial_noise(int(self.seed), tuple(shape), self.noise)


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_latents(latents, source: str, shape: tuple[int, ...] | None) -> np.ndarray:
    """``shape`` None: any shape (the pipeline checks it against its models' later)."""
    array = np.asarray(latents)
    if (shape is not None and array.shape != tuple(shape)) or array.dtype.kind != "f":
        wanted = f"float32 {list(shape)}" if shape is not None else "float32"
        raise InputError(f"{source} holds {array.dtype} {list(array.shape)}; the runtime starts from {wanted} latents")
    if not np.isfinite(array).all():
        raise InputError(f"{source} holds NaN or infinite values; give finite latents")
    return array.astype(np.float32)


# Latents are at most SD3.5's [1,16,128,128]: 1 MiB as float32, a few MiB as text.
LATENTS_LIMIT_BYTES = 64 << 20


def load_latents(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Initial latents from a .npy file, or a .txt of numbers in NCHW order (the random.txt that
    MNN's SD1.5 runtime reads instead of drawing noise when built with MNN_DUMP_DATA: 16384).
    ``shape``: the denoiser's latents; None: a .npy is taken as it is (the pipeline checks it),
    a .txt cannot be read without one (it holds bare numbers)."""
    path = Path(path)
    fix = f"give a .npy file of float32 {list(shape) if shape else 'denoiser-shaped'} latents"
    if path.is_dir() or not path.exists():
        raise InputError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}; {fix}")
    try:
        if path.suffix.lower() == ".txt":
            if shape is None:
                raise ValueError("a .txt of latents is read with the shape of the model's latents")
            expected = tuple(shape)
            text = read_user_text(path, "latents", fix, LATENTS_LIMIT_BYTES, line_limit=None)
            array = np.loadtxt(io.StringIO(text), dtype=np.float32).reshape(-1)
            if array.size != math.prod(expected):
                raise ValueError(f"{array.size} numbers, not {math.prod(expected)}")
            array = array.reshape(expected)
        else:
            if not path.is_file() or path.stat().st_size > LATENTS_LIMIT_BYTES:
                raise InputError(f"{path} is not a file of at most {LATENTS_LIMIT_BYTES >> 20} MiB; {fix}")
            array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path} is not a latents file sd2mnn can read ({err}); save one with numpy.save") from None
    return check_latents(array, str(path), shape)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepEvent:
    """Progress: ``stage`` is text_encoder, the denoiser (unet, transformer) or vae_decoder;
    ``index`` counts from 0; ``denoising``: one of the denoiser's steps."""

    stage: str
    index: int
    total: int
    seconds: float
    denoising: bool = False


@dataclass
class Timings:
    load_s: float  # loading the models (and freeing them, where the memory mode does)
    tokenizer_s: float = 0.0  # loading (ONNX side: building) the tokenizer
    text_encoder_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    vae_decoder_s: float = 0.0
    total_s: float = 0.0  # tokenizing to pixels, not counting load_s

    @property
    def first_step_s(self) -> float:
        return self.step_s[0] if self.step_s else 0.0

    @property
    def steady_step_s(self) -> float:
        """The median of the steps after the first (the first when there is one step)."""
        return statistics.median(self.step_s[1:]) if len(self.step_s) > 1 else self.first_step_s

    def to_dict(self) -> dict:
        return {"load_s": self.load_s, "tokenizer_s": self.tokenizer_s, "text_encoder_s": self.text_encoder_s,
                "step_s": list(self.step_s), "first_step_s": self.first_step_s,
                "steady_step_s": self.steady_step_s, "vae_decoder_s": self.vae_decoder_s, "total_s": self.total_s}


@dataclass
class Generation:
    pixels: np.ndarray  # uint8 RGB [H, W, 3]; a video's [F, H, W, 3]
    latents: np.ndarray  # the final latents, before the decoder's scaling
    params: GenerationParams
    timings: Timings
    metadata: dict[str, str]
    off_contract: list[str] = field(default_factory=list)  # what MNN's runtime would refuse in the models
    divergences: list[str] = field(default_factory=list)  # the request's departures from the runtime
    info: list[str] = field(default_factory=list)  # what the pipeline did that the runtime also does

    @property
    def notes(self) -> list[str]:
        return [f"the image will not match MNN's C++ runtime: {d}" for d in self.divergences] + list(self.info)

    @property
    def is_video(self) -> bool:
        return self.pixels.ndim == 4

    def image(self):
        """A PIL image whose ``info`` holds the metadata (``images.write_png`` writes it); a
        video's: a list of them, one per frame."""
        from PIL import Image

        frames = [Image.fromarray(frame, "RGB") for frame in (self.pixels if self.is_video else [self.pixels])]
        for frame in frames:
            frame.info.update(self.metadata)
        return frames if self.is_video else frames[0]

    def save(self, path: str | os.PathLike) -> Path:
        """A PNG file; a video's: a folder of frame PNGs and an animated WebP (images.write_video)."""
        from sd2mnn.core.images import write_png, write_video

        return write_video(path, self.pixels, self.metadata) if self.is_video else write_png(path, self.pixels, self.metadata)


# ---------------------------------------------------------------------------------------------
# Which models are held when
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelEvent:
    """What happened to one of a pipeline's models: ``action`` "load", "run" (one call) or
    "release"; in order, they say which models were held at each use."""

    action: str
    model: str


def _mnn_collect() -> None:
    """``Executor::getGlobalExecutor()->gc(Executor::FULL)``, as DiffusionSD35 calls it before each
    load and after each release."""
    import MNN.expr as F

    F.gc(1)


class HeldModel:
    """One model of a pipeline behind the MnnModel/OrtModel interface, loaded and freed when the
    family's ModelLifetime says; ``events`` (shared by the pipeline's models) records each load,
    call and release. ``declared_inputs``: its input shapes as its file declares them, for
    ``input_shapes()`` while it is not loaded."""

    def __init__(self, name: str, open_model: Callable[[], object], events: list[ModelEvent],
                 collect: Callable[[], None] | None = None, declared_inputs: dict[str, list[int]] | None = None):
        self.name = name
        self._open = open_model
        self._events = events
        self._collect = collect
        self.declared_inputs = declared_inputs
        self._model = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> float:
        """Load it unless it is held; the seconds that took."""
        if self._model is not None:
            return 0.0
        started = time.perf_counter()
        if self._collect:
            self._collect()
        self._model = self._open()
        self._events.append(ModelEvent("load", self.name))
        return time.perf_counter() - started

    def release(self) -> float:
        """Free it if it is held; the seconds that took."""
        if self._model is None:
            return 0.0
        started = time.perf_counter()
        self._model = None
        if self._collect:
            self._collect()
        self._events.append(ModelEvent("release", self.name))
        return time.perf_counter() - started

    def run(self, feeds):
        self.load()
        self._events.append(ModelEvent("run", self.name))
        return self._model.run(feeds)

    def input_shapes(self) -> dict[str, list[int]]:
        if self._model is None and self.declared_inputs is not None:
            return {k: list(v) for k, v in self.declared_inputs.items()}
        self.load()
        return self._model.input_shapes()


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
def check_source(source: Path, runtime: str) -> None:
    """Refuse a source that is no folder: a bundle for ``runtime`` "mnn", else an ONNX folder."""
    if not source.is_dir():
        what = "does not exist" if not source.exists() else "is not a folder"
        kind = "MNN bundle" if runtime == "mnn" else "ONNX pipeline folder"
        fix = "convert one with sd2mnn convert ONNX_DIR BUNDLE" if runtime == "mnn" else "export one with sd2mnn export"
        raise InputError(f"{source} {what}; give an {kind} ({fix})")


class Pipeline:
    """A family's models and tokenizers, loaded once; ``generate``/``run`` as often as wanted.

    ``Pipeline(bundle)`` runs an MNN bundle with MNN's runtime settings (``mnn_runtime_config``);
    ``Pipeline(onnx_dir, runtime="onnxruntime")`` or ``Pipeline.from_onnx(onnx_dir)`` runs the
    ONNX pipeline it was converted from, on ONNX Runtime, with the same recipe. The family
    (sd2mnn.families.detect) says which models, tokenizers and recipe.

    ``memory_mode`` (MNN): the demo's memory_mode, for when models are loaded and freed, as the
    family's runtime does it (the recipe's ``model_lifetime``; SD3.5: each before its first use, and freed
    after it unless the mode is 1). ``model_events`` records each load, call and release.
    """

    def __init__(self, source: str | os.PathLike, runtime: str = "mnn", config: RuntimeConfig | None = None,
                 tokenizer_scheme: str = DEFAULT_SCHEME, memory_mode: int = 1):
        """``tokenizer_scheme`` (ONNX Runtime only): the ``sd2mnn convert --tokenizer-scheme`` whose
        bundle to imitate; a bundle's own tokenizer.mtok says what it is."""
        self.tokenizer_scheme = tokenizer_scheme
        if runtime not in RUNTIMES:
            raise InputError(f"unknown runtime {runtime!r}; choose {' or '.join(RUNTIMES)}")
        check_memory_mode(memory_mode)
        self.memory_mode = memory_mode
        self.model_events: list[ModelEvent] = []
        self.source = Path(source)
        self.runtime = runtime
        check_source(self.source, runtime)
        self.family = families.detect(self.source)
        self.steps = recipes.steps_for(self.family)
        self.model_lifetime = self.steps.model_lifetime(memory_mode) if runtime == "mnn" else recipes.KEEP_ALL
        self.config = config or mnn_runtime_config(memory_mode=memory_mode, family=self.family)
        self.load_notes: list[str] = []  # what this pipeline does that the runtime does not say
        if runtime == "mnn":
            check_for_use(self.source, self.family, self.family.runtime_components)
        present = self._present_components()
        self.components = tuple(n for n in self.family.runtime_components if n in present)
        self.text_encoders = tuple(n for n in self.components if self.family.components[n].prompt_ids)
        if runtime == "onnxruntime":
            self._check_onnx_vocabulary()
        load = self._load_mnn if runtime == "mnn" else self._load_onnx
        self.tokenizer_s, self.load_s, files = load()
        self.model_hash, self.model_hash_exact = content_hash(self.source, files)
        self._read_sizes()

    @property
    def tokenizer(self) -> PromptIds:
        """The first text encoder's tokenizer (the only one for SD1.x)."""
        return self.tokenizers[self.text_encoders[0]]

    @property
    def denoiser(self) -> str:
        return self.family.denoiser

    @property
    def held(self) -> tuple[str, ...]:
        """The models loaded now, in the runtime's order."""
        return tuple(name for name, model in self._models.items() if model.loaded)

    def _present_components(self) -> set[str]:
        """The runtime's components; an optional one (SD3.5's T5) may be absent: zeros stand in,
        as MNN's runtime does when its model does not load."""
        present = set()
        for name in self.family.runtime_components:
            spec = self.family.components[name]
            if self._model_file(name).is_file():
                present.add(name)
            elif spec.runtime_optional:
                self.load_notes.append(f"no {self._model_file(name).relative_to(self.source).as_posix()}: conditioned on "
                                       f"zeros in its place, as MNN's runtime does without it")
            elif self.runtime == "onnxruntime":
                raise InputError(f"{self._model_file(name)} is missing; export the pipeline with sd2mnn export")
            else:
                present.add(name)  # MnnModel says what is missing and how to fix it
        return present

    def _check_onnx_vocabulary(self) -> None:
        """Before the tokenizer is built from the runtime's ids: a one-line error when its BOS/EOS
        cannot index the text encoder's embedding table."""
        from sd2mnn.core.contract import check_runtime_ids, onnx_vocabulary
        from sd2mnn.core.layout import load_component

        for name in self.text_encoders:
            model = self._model_file(name)
            length = load_component(self.source, name, self.family).summary.inputs[0].shape[1]
            check_runtime_ids(onnx_vocabulary(model), length if isinstance(length, int) else None, model, self.family,
                              name)

    def _model_file(self, name: str) -> Path:
        spec = self.family.components[name]
        return confined(self.source, spec.mnn_name if self.runtime == "mnn" else f"{name}/model.onnx",
                        "replace the link with the file itself")

    def _tokenizer_folder(self, name: str) -> Path:
        """Where a text encoder's tokenizer is: in a bundle, beside the tokenizer.mtok the runtime
        reads for it (SD1.x: the bundle itself; SD3.5: tokenizer_2/...); in an ONNX folder, its
        tokenizer folder."""
        if self.runtime == "mnn":
            return (self.source / bundle_mtok(self.family, name)).parent
        return confined(self.source, self.family.components[name].tokenizer, "replace the link with the folder itself")

    def _prompt_format(self, name: str):
        return self.family.prompt_formats[self.family.components[name].tokenizer]

    def _load_tokenizers(self) -> None:
        self.tokenizers: dict[str, PromptIds] = {}
        for name in self.text_encoders:
            folder = self._tokenizer_folder(name)
            if self.runtime == "mnn":
                if not (folder / MTOK_NAME).is_file():
                    raise InputError(f"{folder / MTOK_NAME} is missing (MNN's runtime reads only this tokenizer file); "
                                     "reconvert the bundle with sd2mnn convert")
                self.tokenizers[name] = PromptIds.for_bundle(folder, self._prompt_format(name))
            else:
                if not folder.is_dir():
                    raise InputError(f"{folder} is missing: {name} is fed its ids; export the pipeline with its "
                                     "tokenizers (sd2mnn export)")
                # As a conversion would write tokenizer.mtok, and the text encoder's id rewrite in numpy.
                self.tokenizers[name] = PromptIds.for_tokenizer(folder, self._prompt_format(name), self.tokenizer_scheme)
        self.tokenizer_notes = []
        if self.runtime == "mnn":
            for mtok in bundle_mtoks(self.family):  # DiffusionSD35::load() fails without any of them
                if not (self.source / mtok).is_file():
                    self.tokenizer_notes.append(f"MNN's runtime would refuse this bundle: {mtok} is missing (it loads "
                                                "every tokenizer, SD3.5's three with or without T5)")

    def _load_mnn(self) -> tuple[float, float, list[str]]:
        names = [self.family.components[n] for n in self.components]
        start = time.perf_counter()
        self._load_tokenizers()
        loaded = time.perf_counter()
        # As load(): one runtime manager for the modules, and shapeMutable = false, so MNN
        # resizes each module (plans memory, packs weights) as it loads, not in the first step.
        manager = mnn_runtime_manager(self.config)
        collect = None if self.model_lifetime.at_start else _mnn_collect
        self._models = {
            spec.name: HeldModel(spec.name, partial(MnnModel, self.source / spec.mnn_name, spec.inputs, spec.outputs,
                                                    self.config, shape_mutable=False, runtime_manager=manager),
                                 self.model_events, collect)
            for spec in names
        }
        for spec in names:
            if self.model_lifetime.at_start:
                self._models[spec.name].load()
            else:
                check_mnn_files(self.source / spec.mnn_name)  # now, not after minutes of drawing
        mtoks = [(self._tokenizer_folder(n) / MTOK_NAME).relative_to(self.source).as_posix() for n in self.text_encoders]
        files = mtoks + [f for spec in names for f in (spec.mnn_name, spec.weight_name)]
        return loaded - start, time.perf_counter() - loaded, files

    def _load_onnx(self) -> tuple[float, float, list[str]]:
        start = time.perf_counter()
        self._load_tokenizers()
        loaded = time.perf_counter()
        self._models = {name: HeldModel(name, partial(OrtModel, self._model_file(name), threads=self.config.threads),
                                        self.model_events) for name in self.components}
        for model in self._models.values():
            model.load()
        folders = {*self.components, *(self.family.components[n].tokenizer for n in self.text_encoders)}
        files = sorted(p.relative_to(self.source).as_posix() for n in folders
                       for p in (self.source / n).rglob("*") if p.is_file())
        return loaded - start, time.perf_counter() - loaded, files

    def _read_sizes(self) -> None:
        """Sizes from the models, not the runtime's constants, so any converted pipeline runs: the
        denoiser's latents, each text encoder's length and vocabulary, the decoder's image;
        ``off_contract`` lists what the runtime itself would refuse."""
        outputs = self._output_shapes()
        self.shapes = {name: self._models[name].input_shapes() for name in self.components}
        self.files = {name: self._model_file(name).relative_to(self.source).as_posix() for name in self.components}
        mismatched = check_same_sizes({name: {"tensors": {t: {"shape": shape} for t, shape in
                                                           {**self.shapes[name], **outputs[name]}.items()}}
                                       for name in self.components}, self.family, self.files)
        if mismatched:  # the runtime would crash or draw garbage
            raise InputError(f"{self.source / mismatched[0].file}: takes {mismatched[0].expected}; it has "
                             f"{mismatched[0].found}")
        sample = self.shapes[self.denoiser].get(self.steps.latent_input, [])
        # [2, C, h, w] (images) or [2, C, T, h, w] (video): the denoiser's batch of two.
        self.latent_shape = (1, *sample[1:]) if len(sample) in (4, 5) and min(sample) > 0 \
            else self.family.recipe.latent_shape
        self.text_lengths = {}
        for name in self.text_encoders:
            ids = self.shapes[name].get("input_ids", [])
            self.text_lengths[name] = ids[1] if len(ids) == 2 and ids[1] > 0 else None
        self.off_contract = self.steps.contract_notes(self.shapes, outputs, self.files, self.family) + self.tokenizer_notes
        decoded = outputs.get("vae_decoder", {}).get("sample", [])
        # A video's decoder, [1, 3, frames, height, width], has its frames; an image's none.
        self.frames = decoded[2] if len(decoded) == 5 and decoded[2] > 0 else None
        if len(decoded) in (4, 5) and all(isinstance(d, int) and d > 0 for d in decoded):
            self.image_size = (decoded[-2], decoded[-1])
        else:  # a decoder of free size: the family's factor
            factor = self.family.recipe.image_size // self.family.recipe.latent_shape[-1]
            self.image_size = (self.latent_shape[-2] * factor, self.latent_shape[-1] * factor)

    def _output_shapes(self) -> dict[str, dict[str, list[int]]]:
        """The models' output shapes as their files declare them (MNN: read in a child process),
        and each text encoder's vocabulary on the way; for a model not loaded yet, its inputs'."""
        from sd2mnn.core.contract import onnx_vocabulary, read_tensors

        if self.runtime == "mnn":
            specs = {n: self.family.components[n] for n in self.components}
            found = read_tensors({n: (self._model_file(n), [*spec.outputs, *spec.inputs],
                                      runtime_input_shapes(n, self.family)) for n, spec in specs.items()})
            self.vocabularies = {n: (found.get(n) or {}).get("vocabulary") for n in self.text_encoders}
            tensors = {n: (found.get(n) or {}).get("tensors") or {} for n in self.components}
            for name, model in self._models.items():
                if not model.loaded:
                    if found.get(name) is None:  # it would fail to load after minutes of drawing
                        raise InputError(f"MNN cannot read {self._model_file(name)}; reconvert it (sd2mnn convert "
                                         "--overwrite), or check it with sd2mnn verify")
                    model.declared_inputs = {t: v["shape"] for t, v in tensors[name].items() if t in specs[name].inputs}
            return {n: {t: v["shape"] for t, v in tensors[n].items() if t in specs[n].outputs} for n in self.components}
        from sd2mnn.core.layout import load_component

        self.vocabularies = {n: onnx_vocabulary(self._model_file(n)) for n in self.text_encoders}
        return {n: {o.name: [d if isinstance(d, int) and d > 0 else -1 for d in o.shape]
                    for o in load_component(self.source, n, self.family).summary.outputs}
                for n in self.components}

    # Kept for callers of the SD1.x engine.
    @property
    def text_length(self) -> int | None:
        return self.text_lengths[self.text_encoders[0]]

    @property
    def vocabulary(self) -> int | None:
        return self.vocabularies[self.text_encoders[0]]

    @classmethod
    def from_onnx(cls, onnx_dir: str | os.PathLike, threads: int = 4, tokenizer_scheme: str = DEFAULT_SCHEME) -> "Pipeline":
        return cls(onnx_dir, runtime="onnxruntime", config=RuntimeConfig(threads=threads),
                   tokenizer_scheme=tokenizer_scheme)

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int = DEFAULT_STEPS, seed: int = 0,
                 guidance: float | None = None, noise: str = "mnn", latents=None, tokenizer: str = "runtime",
                 schedule: str = "runtime", on_step: Callable[[StepEvent], None] | None = None):
        """A PIL image (512x512 RGB for SD1.5, 1024x1024 for SD3.5; a video family's: a list of
        them, one per frame); its ``info`` holds the metadata.

        ``latents``: initial latents (an array, or a .npy/.txt path) instead of drawing noise.
        ``guidance`` None: the family's (the runtime's). ``schedule="diffusers"`` with
        ``tokenizer="hf"``: SD3.5 as diffusers' StableDiffusion3Pipeline draws it.
        """
        source = None
        if latents is not None and not isinstance(latents, np.ndarray):
            source, latents = str(latents), load_latents(latents, self.latent_shape)
        params = GenerationParams(prompt, negative_prompt, steps, seed, guidance, noise, latents, source, tokenizer,
                                  schedule)
        return self.run(params, on_step).image()

    def check_size(self, params: GenerationParams) -> None:
        """A size asked for must be the one the models were exported at (static shapes)."""
        check_image_size(params, (*self.image_size, self.frames), self.source / self.files["vae_decoder"], self.family)

    def _prompt_ids(self, name: str, params: GenerationParams) -> tuple[np.ndarray, np.ndarray]:
        """(what the text encoder is fed, what its embedding table sees): MNN's runtime's ids (a
        bundle's text encoder rewrites them itself; on ONNX Runtime the rewrite runs in numpy),
        or Hugging Face's."""
        tokens, length = self.tokenizers[name], self.text_lengths[name]
        if params.tokenizer == "hf":
            ids = tokens.hf_pair(params.prompt, length, params.negative_prompt)
            return tokens.graph_feed(ids), ids
        model_ids = tokens.model_pair(params.prompt, length, params.negative_prompt)
        if self.runtime == "mnn":
            return tokens.runtime_pair(params.prompt, length, params.negative_prompt), model_ids
        return model_ids, model_ids

    def _scheduler(self, params: GenerationParams):
        recipe = self.family.recipe
        return schedulers.make(recipe.diffusers_scheduler if params.schedule == "diffusers" else recipe.scheduler,
                               params.steps)

    @np.errstate(over="ignore", invalid="ignore")  # overflow is caught below, with one clear error
    def run(self, params: GenerationParams, on_step: Callable[[StepEvent], None] | None = None) -> Generation:
        params.validate(self.family, self.latent_shape)
        self.check_size(params)
        guidance = params.guidance_for(self.family)
        report = on_step or (lambda event: None)
        timings = Timings(load_s=self.load_s, tokenizer_s=self.tokenizer_s)
        started = time.perf_counter()

        # The ids that reach each embedding table must fit it: before any model runs.
        feeds = {}
        for name in self.text_encoders:
            feeds[name], model_ids = self._prompt_ids(name, params)
            check_vocabulary(model_ids, self.vocabularies[name], self._model_file(name))
        t, moved = time.perf_counter(), timings.load_s
        outputs = {}
        for name in self.text_encoders:
            with self._holding(name, timings):
                # The ids too: a runtime may derive the denoiser's inputs from them (Wan's mask).
                outputs[name] = {"input_ids": feeds[name], **self._models[name].run({"input_ids": feeds[name]})}
        text = self.steps.condition(outputs, self.shapes, self.files)
        timings.text_encoder_s = time.perf_counter() - t - (timings.load_s - moved)
        report(StepEvent("text_encoder", 0, 1, timings.text_encoder_s))

        latent = params.initial_latents(self.latent_shape)
        scheduler = self._scheduler(params)
        output = self.family.components[self.denoiser].outputs[0]
        with self._holding(self.denoiser, timings):
            for i, timestep in enumerate(scheduler.timesteps):
                t = time.perf_counter()
                out = self._models[self.denoiser].run(self.steps.denoiser_feeds(latent, timestep, text))[output]
                latent = scheduler.step(guide(out, guidance), i, latent)
                timings.step_s.append(time.perf_counter() - t)
                report(StepEvent(self.denoiser, i, params.steps, timings.step_s[-1], denoising=True))

        t = time.perf_counter()
        recipe = self.family.recipe
        scaled = scale_latents(latent, recipe.latent_scale, recipe.latent_shift)
        _check_finite(scaled, "the latents", params, guidance, recipe.guidance)
        moved = timings.load_s
        with self._holding("vae_decoder", timings):
            decoded = self._models["vae_decoder"].run({"latent_sample": scaled})["sample"]
            _check_finite(decoded, "the VAE decoder's output", params, guidance, recipe.guidance)
            pixels = decoded_to_frames(decoded) if decoded.ndim == 5 else decoded_to_pixels(decoded)
            timings.vae_decoder_s = time.perf_counter() - t - (timings.load_s - moved)
        report(StepEvent("vae_decoder", 0, 1, timings.vae_decoder_s))
        timings.total_s = time.perf_counter() - started - (timings.load_s - self.load_s)
        return Generation(pixels, latent, params, timings, self.metadata(params), list(self.off_contract),
                          divergences=params.divergences(self.family), info=list(self.load_notes))

    @contextmanager
    def _holding(self, name: str, timings: Timings):
        """``name`` loaded for the block (unless held already: loadModule) and, where the lifetime
        says so, freed after it; the time both take goes to ``timings.load_s``."""
        model = self._models[name]
        timings.load_s += model.load()
        try:
            yield
        finally:
            if self.model_lifetime.release_after_use:
                timings.load_s += model.release()

    def metadata(self, params: GenerationParams) -> dict[str, str]:
        """What the PNG records: enough to redo the image and to know what made it."""
        divergences = params.divergences(self.family) + self.off_contract
        meta = {"Software": f"sd2mnn {__version__}", "prompt": params.prompt}
        if params.negative_prompt:
            meta["negative_prompt"] = params.negative_prompt
        meta["steps"] = str(params.steps)
        if params.latents is None:
            meta["seed"] = str(params.seed)
            meta["noise"] = params.noise
        else:
            digest = hashlib.sha256(np.ascontiguousarray(params.latents, dtype=np.float32).tobytes()).hexdigest()
            meta["noise"] = f"latents {Path(params.latents_source).name if params.latents_source else 'array'}"
            meta["latents_sha256"] = digest
        meta["guidance"] = f"{params.guidance_for(self.family):g}"
        meta["tokenizer"] = f"{params.tokenizer} (scheme {self.tokenizer.tokenizer_scheme})"
        if self.family.named_in_metadata:
            meta["family"] = self.family.name
        if params.schedule != "runtime":
            meta["schedule"] = params.schedule
        if self.load_notes:
            meta["notes"] = "; ".join(self.load_notes)
        meta["runtime"] = self.runtime
        if self.runtime == "mnn":
            c = self.config
            hints = ",".join(f"{hint}:{value}" for hint, value in c.hints)
            meta["mnn_config"] = (f"backend={c.backend} threads={c.threads} precision={c.precision} memory={c.memory} "
                                  f"winograd={'on' if c.winograd else 'off'} hints={hints or '-'}")
        else:
            meta["onnxruntime_threads"] = str(self.config.threads)
        meta["bundle" if self.runtime == "mnn" else "onnx_dir"] = self.source.resolve().name
        meta["bundle_hash" if self.runtime == "mnn" else "onnx_hash"] = self.model_hash
        if not self.model_hash_exact:
            meta["hash_note"] = "files over 64 MiB not recorded in manifest.json are identified by size and mtime"
        meta["matches_mnn_runtime"] = "yes" if not divergences else "no: " + "; ".join(divergences)
        if self.off_contract:
            meta["mnn_runtime_contract"] = "; ".join(self.off_contract)
        return meta


def declared_image_size(source: str | os.PathLike, runtime: str,
                        family: Family) -> tuple[int, int, int | None] | None:
    """(height, width, frames) of the image or video (frames None: an image) the VAE decoder's
    file declares, before loading anything (None where it is not fixed or not readable)."""
    source, spec = Path(source), family.components["vae_decoder"]
    if runtime == "mnn":
        from sd2mnn.core.contract import read_tensors

        found = read_tensors({"d": (source / spec.mnn_name, ["sample"], runtime_input_shapes("vae_decoder", family))})["d"] or {}
        shape = ((found.get("tensors") or {}).get("sample") or {}).get("shape") or []
    else:
        from sd2mnn.core.layout import load_component

        try:
            outputs = load_component(source, "vae_decoder", family).summary.outputs
        except InputError:
            return None  # loading the pipeline says what is wrong with it
        shape = next((list(o.shape) for o in outputs if o.name == "sample"), [])
    if len(shape) not in (4, 5) or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    return shape[-2], shape[-1], (shape[2] if len(shape) == 5 else None)


def check_image_size(params: GenerationParams, size: tuple[int, int, int | None], decoder: Path,
                     family: Family) -> None:
    """Refuse --height/--width (a video's: --frames) other than the models' (their shapes were
    fixed at export; MNN's Wan runtime takes them as arguments and checks nothing)."""
    height, width, frames = size
    drawn = f"{width}x{height} images" if frames is None else f"{frames} frames of {width}x{height}"
    for name, asked, have in (("height", params.height, height), ("width", params.width, width),
                              ("frames", params.frames, frames)):
        if asked is not None and asked != have:
            runtime = f"; MNN's runtime draws {family.recipe.image_size}x{family.recipe.image_size} only" \
                if family.recipe.draws_only_image_size else ""
            option = "--frames" if name == "frames" else "--height/--width"
            raise InputError(f"{decoder} draws {drawn} (fixed at export); --{name} {asked} needs a pipeline "
                             f"exported at that size (sd2mnn export {option}){runtime}")


def _check_finite(values: np.ndarray, what: str, params: GenerationParams, guidance: float,
                  runtime_guidance: float) -> None:
    """MNN's Relu6 turns NaN into 1 and clamps infinity: the image would be silently white."""
    if not np.isfinite(values).all():
        raise InputError(f"{what} overflowed to NaN or infinity ({params.steps} steps, guidance {guidance:g}); "
                         f"no image written. Start from noise of normal size, keep guidance near {runtime_guidance:g}, "
                         "and check the bundle with sd2mnn verify")


_HASH_LIMIT = 64 << 20  # hash smaller files on every run; bigger ones only via manifest.json


def content_hash(root: Path, files: list[str]) -> tuple[str, bool]:
    """A short id of the model files: sha256 over each file's sha256, taken from manifest.json when
    its recorded size and mtime still hold (never re-hashing gigabytes). Returns (id, exact)."""
    recorded = {}
    try:
        manifest = read_manifest(root / MANIFEST_NAME)
    except InputError:
        manifest = None
    if manifest is not None:
        recorded = {record.path: record for record in manifest.bundle_files()}
    digest, exact = hashlib.sha256(), True
    for rel in files:
        path = root / rel
        if not path.is_file():
            continue
        record = FileRecord.of(path, root, recorded.get(rel), hash_now=path.stat().st_size <= _HASH_LIMIT)
        file_id = record.sha256
        if not file_id:
            file_id, exact = f"size={record.size} mtime_ns={record.mtime_ns}", False
        digest.update(f"{rel} {file_id}\n".encode())
    return digest.hexdigest()[:16], exact
