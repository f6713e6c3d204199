"""Export a diffusers Stable Diffusion pipeline to the ONNX folder MNN's tools expect.

SD1.x (SD1.5, Taiyi): layout and tensor contract follow MNN's transformers/diffusion/export/onnx_export.py
and the C++ runtime (stable_diffusion.cpp)::

    ONNX_DIR/text_encoder/model.onnx   input_ids int32 [2, L] -> last_hidden_state, pooler_output
    ONNX_DIR/unet/model.onnx           sample f32 [2,4,h,w], timestep int32 [1],
      + unet/weights.pb                encoder_hidden_states f32 [2,L,D] -> out_sample
    ONNX_DIR/vae_encoder/model.onnx    sample f32 [1,3,H,W] -> latent_sample
    ONNX_DIR/vae_decoder/model.onnx    latent_sample f32 [1,4,h,w] -> sample
    ONNX_DIR/tokenizer/                the pipeline's tokenizer files, as they are

L is 77 for SD1.5 (CLIP) and 512 for Taiyi (BERT); h, w = H/f, W/f for the VAE's scale factor f
(8 for SD1.5).

SD3.5 (a StableDiffusion3Pipeline folder): MNN ships no exporter; the contract is its runtime's
(diffusion_sd35.cpp, sd2mnn.families.sd35)::

    ONNX_DIR/text_encoder/model.onnx   CLIP-L: input_ids int32 [2,77] -> last_hidden_state, text_embeds
    ONNX_DIR/text_encoder_2/model.onnx CLIP-G, the same tensors (+ weights.pb)
    ONNX_DIR/text_encoder_3/model.onnx T5: input_ids int32 [2,256] -> last_hidden_state (+ weights.pb)
    ONNX_DIR/transformer/model.onnx    hidden_states [2,C,h,w], encoder_hidden_states [2,333,D],
      + transformer/weights.pb         pooled_projections [2,P], timestep f32 [2] -> out_hidden_states
    ONNX_DIR/vae_decoder/model.onnx    latent_sample [1,C,h,w] -> sample
    ONNX_DIR/tokenizer{,_2,_3}/        the pipeline's tokenizer files, as they are

The CLIPs' ``last_hidden_state`` is their penultimate layer's output (``hidden_states[-2]``), the
one diffusers' StableDiffusion3Pipeline conditions on, under the name the runtime reads. T5 may be
left out (``components``): the runtime then conditions on zeros, as diffusers does without it.

Shapes are static. H and W default to the model's own size, as diffusers picks it:
``unet.config.sample_size * vae_scale_factor`` (512 for SD1.5); MNN's runtime runs 64x64 latents
only, which sd2mnn verify and generate point out for any other size.

Before a component is built, the memory its export needs (torch.onnx.export's copies of the
weights, then ONNX Runtime's check, which materializes every attention matrix) is estimated from
the configs; a size that cannot fit in the available memory is refused with the numbers, before
anything is loaded.

Before anything is loaded or written, the folder is checked (sd2mnn.exporting.diffusers_folder): the classes
model_index.json names (only those the family loads: a model's own code never runs), the config
values export sizes with, the latent channels MNN's runtime draws with, the tokenizer files, and
links that leave the folder.

One component is loaded, exported, run in PyTorch, freed, then checked against those outputs in
ONNX Runtime (in a child process, since it does not give memory back). The inputs are those sd2mnn
verify will feed it, and ONNX Runtime runs all of verify's cases: what it gives is kept in the
folder (sd2mnn.verification.references) for verify to compare MNN with, instead of loading and
running every model in ONNX Runtime once more.
The folder is written beside ONNX_DIR and renamed into place only when every part passed.
A single-file checkpoint is first written as a diffusers folder in that scratch space, one model at
a time (sd2mnn.exporting.checkpoint).

What users bring changes the pipeline before export: LoRAs are fused into each model they target as
it is loaded (sd2mnn.exporting.lora; each first tried on the models built without weights), and
a --vae folder takes the pipeline's VAE's place through a view of the pipeline whose vae/ links to
it (its scaling folded into the decoder's graph where MNN's runtime scales latents otherwise:
sd2mnn.exporters.vae). Both are recorded in the ONNX folder's marker for the bundle's manifest.

What differs by family (the torch modules, their dummy inputs, the memory terms, the export order)
is the family's exporter (sd2mnn.exporters), looked up by the family's name for it.

torch, diffusers and transformers are the ``export`` extra and are imported only when needed.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from sd2mnn import families
from sd2mnn.core.children import interrupts_deferred
from sd2mnn.core.files import is_inside, read_json_object
from sd2mnn.core.layout import load_component
from sd2mnn.core.onnx_scan import TensorSpec
from sd2mnn.errors import InputError, MissingExtraError, Sd2MnnError, os_errors_as_one_line
from sd2mnn.exporting import checkpoint, diffusers_folder, lora
from sd2mnn.families import FAMILIES, Family
from sd2mnn.verification import references

# Every component some family exports.
KNOWN_COMPONENTS = tuple(dict.fromkeys(n for f in FAMILIES.values() for n in f.components))
# The one external-data file a model's weights are gathered into when they are not inline.
WEIGHTS_FILE = "weights.pb"


class ExportCheckError(Sd2MnnError):
    """An exported ONNX model disagrees with its PyTorch module beyond the tolerance."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 18
    # None: every component of the model's family (SD3.5 without T5 when the pipeline has none).
    components: tuple[str, ...] | None = None
    # With components None: only those convert converts by default (no vae_encoder: convert's
    # export of a diffusers model, which would throw it away).
    default_components_only: bool = False
    # Image size; None: the model's own (unet sample_size * the VAE's scale factor).
    height: int | None = None
    width: int | None = None
    # Video frames (a video family only); None: the family's runtime's documented default.
    frames: int | None = None
    # For a single-file checkpoint: a local diffusers folder of the same model with its configs,
    # tokenizers and scheduler (sd2mnn.exporting.checkpoint), weights only for the models the file lacks.
    config: Path | None = None
    overwrite: bool = False
    check: bool = True
    seed: int = 0
    # Per-component atol replacing the family's (e.g. {"vae_decoder": 0.0} to see a check fail).
    tolerances: dict[str, float] | None = None
    # Bytes the export check may use; None: what the system has available now.
    memory_budget: int | None = None
    # LoRAs fused into the weights they target before export (sd2mnn.exporting.lora), in order.
    loras: tuple[lora.Lora, ...] = ()
    # A diffusers VAE folder (AutoencoderKL, or AutoencoderTiny: TAESD) exported in place of the pipeline's.
    vae: Path | None = None


@dataclass
class ComponentReport:
    name: str
    path: Path
    inputs: dict[str, tuple[str, tuple[int, ...]]]
    outputs: dict[str, tuple[str, tuple[int, ...]]]
    max_abs_error: dict[str, float] = field(default_factory=dict)
    # |onnx - torch| must stay under tolerance * max(1, max |torch|): the family's
    # ComponentSpec.export_atol (fp32 export; ONNX Runtime's kernels differ in summation order).
    tolerance: float | None = None
    seconds: float = 0.0
    size_bytes: int = 0


@dataclass
class ExportReport:
    source: Path
    onnx_dir: Path
    kind: str  # the family: "sd15", "taiyi" or "sd35"
    text_length: int
    opset: int
    components: list[ComponentReport] = field(default_factory=list)
    height: int = 0  # the image size exported
    width: int = 0
    frames: int = 0  # the video frames exported (0: an image family)
    loras: list[lora.LoraRecord] = field(default_factory=list)  # merged into the weights
    vae: dict = field(default_factory=dict)  # the VAE put in the pipeline's own's place: folder, class

    @property
    def max_abs_error(self) -> float:
        return max((e for c in self.components for e in c.max_abs_error.values()), default=0.0)


Progress = Callable[[str, str], None]  # (component, message)


def is_diffusers_model(path: str | Path) -> bool:
    """True for a diffusers pipeline folder (model_index.json) or a .safetensors/.ckpt file."""
    p = Path(path)
    if p.is_dir():
        return (p / "model_index.json").is_file()
    return p.is_file() and p.suffix.lower() in checkpoint.SUFFIXES


def require_export_extra(loras: bool = False) -> None:
    """Raise MissingExtraError unless torch, diffusers and transformers import (and PEFT, which
    diffusers merges ``loras`` with)."""
    missing = []
    for name in ("torch", "diffusers", "transformers", "safetensors") + (("peft",) if loras else ()):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"export needs {', '.join(missing)}: run pip install 'sd2mnn[export]'"
        )


# ---------------------------------------------------------------------------------------------
# Source model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    folder: Path  # a diffusers pipeline folder with weights
    index: dict  # model_index.json
    family: Family
    loras: tuple[lora.Lora, ...] = ()  # fused into each model they target as it is loaded

    def has(self, name: str) -> bool:
        entry = self.index.get(name)
        return isinstance(entry, list) and len(entry) == 2 and all(entry)

    @property
    def kind(self) -> str:
        return self.family.name

    def component_class(self, name: str) -> tuple[str, str]:
        entry = self.index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            raise InputError(f"{self.folder / 'model_index.json'}: no {name!r} component")
        return entry[0], entry[1]


def _open_source(folder: Path, components: tuple[str, ...] | None = None, confine: bool = True) -> _Source:
    """The pipeline at ``folder``, checked for what exporting ``components`` (None: all) reads:
    every model's config (for the sizes), its tokenizers, the classes model_index.json names
    (sd2mnn.exporting.diffusers_folder); ``confine``: no link may leave ``folder``. Weights are checked
    when loaded."""
    index = diffusers_folder.read_index(folder)
    family = families.detect(folder)
    source = _Source(folder, index, family)
    wanted = components or tuple(n for n, spec in family.components.items() if source.has(n) or not spec.runtime_optional)
    models = dict.fromkeys(family.model_folder(n) for n, spec in family.components.items()
                           if n in wanted or not spec.runtime_optional)
    for name in components or ():
        if family.components.get(name) and family.components[name].runtime_optional and not source.has(name):
            raise InputError(f"{folder / 'model_index.json'}: no {name!r} component; leave it out of --components")
    for name in models:
        if not (folder / name).is_dir():
            raise InputError(f"{folder / name}: missing; {_pipeline_name(family)} needs it")
    for name in family.prompt_formats:
        if not (folder / name).is_dir():
            why = _exporter(family).tokenizer_fix or f"{_pipeline_name(family)} needs it"
            raise InputError(f"{folder / name}: missing; {why}")
    for name in models:
        if not (folder / name / "config.json").is_file():
            raise InputError(f"{folder / name / 'config.json'}: missing; re-download the model")
    diffusers_folder.check_pipeline(folder, index, family, tuple(models), confine)
    _exporter(family).check_folder(folder)
    return source


def _pipeline_name(family: Family) -> str:
    return f"a {family.title} pipeline"


def _exporter(family: Family):
    from sd2mnn.exporters import exporter_for

    return exporter_for(family)


# ---------------------------------------------------------------------------------------------
# Jobs: a torch module whose graph inputs and outputs are exactly as MNN's runtime names and types
# them, with its dummy inputs (the family's exporter builds them)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Job:
    module: object  # torch.nn.Module
    inputs: dict  # name -> torch tensor
    outputs: list[str]


def _model_class(source: _Source, sub: str):
    """The library class model_index.json names for ``sub`` (a model's own code never runs)."""
    library, cls_name = source.component_class(sub)
    if library == "transformers":
        import transformers as lib
    elif library == "diffusers":
        import diffusers as lib
    else:
        raise InputError(f"{source.folder / 'model_index.json'}: unknown library {library!r}")
    cls = getattr(lib, cls_name, None)
    if cls is None:
        raise InputError(
            f"{source.folder / 'model_index.json'}: {library} has no class {cls_name}; "
            f"upgrade {library}"
        )
    if getattr(cls, "_keep_in_fp32_modules", None):
        # Those (WanTransformer3DModel) load only through accelerate, which export does not need:
        # in float32 there is nothing to keep in float32.
        cls = type(cls.__name__, (cls,), {"_keep_in_fp32_modules": None})
    return cls


def _load(source: _Source, sub: str):
    import torch

    cls = _model_class(source, sub)
    library, cls_name = source.component_class(sub)
    folder = source.folder / sub
    kwargs = {"torch_dtype": torch.float32, "local_files_only": True}
    if library == "transformers":
        kwargs["trust_remote_code"] = False  # a model's own code never runs, and nothing asks
    names = {p.name for p in folder.iterdir()}
    if not any(n.split(".")[-1] in ("safetensors", "bin") and ".fp16." not in n for n in names):
        if any(".fp16." in n for n in names):
            kwargs["variant"] = "fp16"  # only fp16 weights shipped: load them, export in fp32
        else:
            raise InputError(f"{folder}: no weights (*.safetensors or *.bin); re-download the model")
    try:
        model = cls.from_pretrained(str(folder), **kwargs)
    except Exception as err:  # the libraries raise many types for unreadable or mismatched files
        checkpoint.refuse_unsafe_pickle(err, folder)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{folder}: cannot load {cls_name} ({first})") from err
    loader = _lora_loader(source.family) if source.loras else None
    if loader is not None and sub in loader._lora_loadable_modules:  # never the VAE
        model = lora.merge(model, sub, source.loras, loader, folder)
    return model.eval()


def _empty_model(source: _Source, sub: str):
    """``sub``'s model built from its config on the meta device: its layers, no weights."""
    import torch

    cls = _model_class(source, sub)
    folder = source.folder / sub
    try:
        with torch.device("meta"):
            if source.component_class(sub)[0] == "diffusers":
                return cls.from_config(cls.load_config(str(folder)))
            return cls(cls.config_class.from_pretrained(str(folder), local_files_only=True))
    except Exception as err:  # the libraries raise many types for configs they cannot read
        raise InputError(f"{folder / 'config.json'}: cannot build {cls.__name__} from it ({err})") from err


def _lora_loader(family: Family):
    return lora.loader_class(_exporter(family).lora_loader)


def _check_loras(source: _Source, names: list[str]) -> list[lora.LoraRecord]:
    """Try each LoRA on every model it targets among ``names``, built without weights; refuse one
    that does not fit, naming its file (sd2mnn.exporting.lora). The records for the manifest."""
    loader = _lora_loader(source.family)
    records = []
    for index, item in enumerate(source.loras):
        weights = lora.read(item, loader)
        lora.check_targets(weights, loader, tuple(source.family.components), _pipeline_name(source.family))
        targets = tuple(n for n in names if n in weights.targets)  # in export order
        for target in targets:
            lora.inject(_empty_model(source, target), target, weights, loader, f"sd2mnn_{index}", source.folder / target)
        records.append(lora.record(item, targets))
    return records


def _load_tokenizer(source: _Source, folder: str = "tokenizer"):
    import transformers

    cls_name = diffusers_folder.class_of(source.index, source.family, folder)[1]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise InputError(f"{source.folder / 'model_index.json'}: transformers has no class {cls_name}; "
                         "upgrade transformers")
    try:
        return cls.from_pretrained(str(source.folder / folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # the libraries raise many types for unreadable files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{source.folder / folder}: cannot load the tokenizer ({first})") from err


def _text_ids(source: _Source, length: int, folder: str = "tokenizer"):
    """[uncond, prompt] ids as MNN's runtime builds them: BOS ... EOS (T5: ... EOS), padded with 0."""
    import torch

    tokenizer = _load_tokenizer(source, folder)
    rows = []
    for prompt in source.family.check_prompts:
        ids = tokenizer(prompt, truncation=True, max_length=length)["input_ids"]
        rows.append(list(ids) + [0] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.int32)


def _build_job(source: _Source, name: str, options: ExportOptions, text_length: int) -> _Job:
    import torch

    gen = torch.Generator().manual_seed(options.seed)
    job = _exporter(source.family).jobs[name](source, options, text_length, gen)
    # A wrapper module starts in training mode, and torch.onnx.export puts that mode back on the
    # model it wraps after exporting in eval mode: dropout would then run in the reference.
    job.module.eval()
    return job


def _vae_factor(source: _Source) -> int:
    return _scale_factor(_config(source.folder, "vae"))


def _config(folder: Path, sub: str) -> dict:
    return read_json_object(folder / sub / "config.json")


def _scale_factor(vae_config: dict) -> int:
    """diffusers' ``vae_scale_factor``: 2 ** (len(block_out_channels) - 1), 8 for SD1.5; a video
    VAE's (AutoencoderKLWan) states its own spatial factor."""
    if vae_config.get("scale_factor_spatial"):
        return int(vae_config["scale_factor_spatial"])
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def image_size(folder: Path, height: int | None, width: int | None, family: Family) -> tuple[int, int]:
    """(height, width) to export: the given ones, else the model's own as diffusers' pipeline
    takes it (``sample_size * vae_scale_factor`` of the family's denoiser; a denoiser without one,
    the family's runtime's image size). Each must give latents the denoiser's down-sampling (or
    patching) divides."""
    model, vae = _config(folder, family.denoiser), _config(folder, "vae")
    factor = _scale_factor(vae)
    size = _pair(model.get("sample_size") or family.recipe.image_size // factor)
    height = height or size[0] * factor
    width = width or size[1] * factor
    step = _exporter(family).size_step(model, factor)
    default = f"its default is {size[0] * factor}x{size[1] * factor}"
    for name, value in (("height", height), ("width", width)):
        if value % step:
            raise InputError(f"--{name} {value}: this model needs a multiple of {step} pixels "
                             f"(VAE factor {factor}; {default})")
    # SD3's positional embedding covers pos_embed_max_size patches a side, no more.
    most = int(model.get("pos_embed_max_size") or 0) * step
    if most and max(height, width) > most:
        raise InputError(f"--height/--width {width}x{height}: this model's positional embedding covers at most "
                         f"{most} pixels a side ({default})")
    return height, width


def video_frames(frames: int | None, family: Family) -> int | None:
    """The frames to export a video family at (its runtime's documented default unless given);
    None for an image family, which refuses ``frames``."""
    if not family.recipe.frames:
        if frames is not None:
            raise InputError(f"--frames {frames}: {family.title or family.name} draws images; leave --frames out")
        return None
    frames = frames or family.recipe.frames
    step = family.recipe.frames_step
    if (frames - 1) % step:
        raise InputError(f"--frames {frames}: the VAE decodes {step}n + 1 frames; give {frames - (frames - 1) % step} "
                         f"or {frames - (frames - 1) % step + step}")
    return frames


# Over this many bytes of initializers torch.onnx.export writes each tensor to a file of its own
# (protobuf's limit, INT_MAX); below it the model proto holds every weight inline.
TORCH_EXTERNAL_DATA_SWITCH = 2**31 - 1
# The exporting process itself: Python with torch, diffusers and transformers loaded (0.31 GiB
# measured before loading a model, 0.44 GiB beside SD3.5's 1024x1024 check).
EXPORTER_BYTES = 2**29


def _per_block(value, blocks: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value or 1)] * blocks


def weights_bytes(folder: Path, name: str, family: Family) -> int:
    """The size of a component's weight files (what loading it takes, whatever the export size)."""
    weights_dir = folder / family.model_folder(name)
    return sum(p.stat().st_size for p in weights_dir.glob("*") if p.suffix in (".safetensors", ".bin"))


def check_bytes(folder: Path, name: str, height: int, width: int, text_length: int, family: Family,
                frames: int | None = None) -> int:
    """An estimate of the peak memory of one component's export, in bytes: the larger of its two
    phases, which never overlap (the PyTorch module is freed before ONNX Runtime's check starts).

    - Loading and torch.onnx.export: below torch's 2 GiB switch, the weights, the model proto
      holding them all inline and its serialized copy (3x the weights); above it, where the
      exporter writes tensor by tensor to files, the weights and half as much again (measured).
    - The check: ONNX Runtime's weights, each attention's score matrix (batch x heads x tokens x
      tokens, float32) and its softmax (the family's exporter's MemoryTerms).
    Both keep eight feature maps of the widest level, and the exporting process itself.

    Measured on a 2-core, 24 GiB machine (the tests pin these): SD3.5 Medium's transformer peaks at
    12.85 GiB at 256x256 (export phase) and 17.04 GiB at 1024x1024 (check phase); a 4-layer one of
    its widths, below the switch, 6.95 GiB at 512x512; the estimate is 8-13% above each.
    """
    weights = weights_bytes(folder, name, family)
    factor = _scale_factor(_config(folder, "vae"))
    video = {"frames": frames} if frames else {}  # a video family's terms take its frames
    terms = _exporter(family).terms[name](folder, name, height // factor, width // factor, height, width, text_length,
                                          **video)
    attention, activation, folded = terms.attention, terms.activation, terms.folded
    export_phase = weights + (weights // 2 if weights - folded > TORCH_EXTERNAL_DATA_SWITCH else 2 * weights)
    export_phase += terms.export_extra
    check_phase = weights + 2 * attention + terms.check_extra
    return EXPORTER_BYTES + 8 * activation + max(export_phase, check_phase)


def check_memory(folder: Path, names: list[str], height: int, width: int, text_length: int, family: Family,
                 budget: int | None = None, lengths: dict[str, int] | None = None, frames: int | None = None) -> None:
    """Refuse, with the numbers, an export whose check cannot fit in ``budget`` bytes (default:
    the memory available now). ``lengths``: a component's own text length, where not ``text_length``."""
    if budget is None:
        import psutil

        budget = psutil.virtual_memory().available
    lengths = lengths or {}
    needs = {n: check_bytes(folder, n, height, width, lengths.get(n, text_length), family, frames) for n in names}
    worst = max(needs, key=needs.get)
    weights = weights_bytes(folder, worst, family)
    if needs[worst] > budget and weights * 3 // 2 > budget:  # no size helps: loading and writing it alone do not fit
        raise InputError(
            f"{folder / family.model_folder(worst)}: its weights are {weights / 2**30:.1f} GiB and exporting them "
            f"needs about {needs[worst] / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB available, at any size; "
            "export on a machine with more memory")
    if needs[worst] > budget:
        raise InputError(
            f"{folder / family.model_folder(worst)}: checking the {worst} at {width}x{height}"
            f"{f', {frames} frames,' if frames else ''} needs "
            f"about {needs[worst] / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB available; export at a smaller "
            f"--height/--width (the model's default is its own size) or free memory")


# ---------------------------------------------------------------------------------------------
# ONNX writing and checking
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_libraries():
    """Silence tracer warnings, load progress bars and info logs; restore them afterwards."""
    import diffusers
    import transformers

    d_level = diffusers.utils.logging.get_verbosity()
    t_level = transformers.utils.logging.get_verbosity()
    t_bars = transformers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.utils.logging.set_verbosity(d_level)
        transformers.utils.logging.set_verbosity(t_level)
        if t_bars:
            transformers.utils.logging.enable_progress_bar()


def _torch_export(job: _Job, path: Path, opset: int) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(job.inputs.values())
    with torch.no_grad():
        torch.onnx.export(
            job.module, args, str(path), input_names=list(job.inputs), output_names=job.outputs,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )


def consolidate_external_data(model_path: Path, location: str = WEIGHTS_FILE,
                              size_threshold: int = 1024) -> None:
    """Leave ``model_path``'s folder with the model and one weights file, ``location``.

    Every initializer of ``size_threshold`` bytes or more moves into ``location``. Over 2 GiB of
    initializers, torch's exporter writes every tensor of more than 1024 elements to a file of its
    own, node attributes included (a LayerNorm without affine weights exports its ones and zeros as
    Constant values: SD3.5's transformer gets 192 such files); those go back inline, as torch
    writes them below 2 GiB, so the external data is initializers only, which convert checks.
    Streams tensor by tensor (a full-size UNet never sits in memory twice) and removes the
    per-tensor files the exporter wrote.
    """
    import onnx

    folder = model_path.parent
    model = onnx.load(str(model_path), load_external_data=False)
    old_files: set[Path] = set()
    for tensor in _nested_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.raw_data = _read_external(folder, tensor, old_files)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    tmp = folder / (location + ".tmp")
    offset = 0
    with open(tmp, "wb", buffering=0) as out:  # unbuffered: the kernel copies external data in
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                source = _external_source(folder, tensor, old_files)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= size_threshold:
                source = tensor.raw_data
            else:
                continue
            pad = (-offset) % 4096  # page-aligned, as onnx's own writer does
            _write_all(out, b"\0" * pad)
            offset += pad
            length = _append(out, source)
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += length
    for old in old_files:
        if old.name != location:
            old.unlink(missing_ok=True)
    os.replace(tmp, folder / location)
    onnx.save(model, str(model_path))


def _external_source(folder: Path, tensor, sources: set[Path]) -> tuple[Path, int, int]:
    """(file, offset, length) of ``tensor``'s external data in ``folder``; the file is added to
    ``sources``."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    src = folder / info.location
    sources.add(src)
    offset = info.offset or 0
    return src, offset, info.length or src.stat().st_size - offset


def _read_external(folder: Path, tensor, sources: set[Path]) -> bytes:
    """The bytes of ``tensor``'s external data in ``folder``; its file is added to ``sources``."""
    src, offset, length = _external_source(folder, tensor, sources)
    with open(src, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _write_all(out, data: bytes) -> None:
    """All of ``data`` to the unbuffered ``out`` (a raw write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


def _append(out, source) -> int:
    """Write ``source`` (bytes, or a (file, offset, length) range) at the end of the unbuffered
    ``out``; returns its length. A range is copied by the kernel where it can (copy_file_range):
    a full-size unet's 3.4 GB then never pass through Python."""
    if isinstance(source, bytes):
        _write_all(out, source)
        return len(source)
    path, offset, length = source
    with open(path, "rb") as stream:
        done = _kernel_copy(stream, out, offset, length)
        stream.seek(offset + done)
        while done < length and (chunk := stream.read(min(64 << 20, length - done))):
            _write_all(out, chunk)
            done += len(chunk)
    if done != length:
        raise OSError(f"{path}: {done} of the {length} bytes its tensor should hold")
    return length


def _kernel_copy(stream, out, offset: int, length: int) -> int:
    """Bytes of ``stream`` from ``offset`` copied to ``out`` by copy_file_range (fewer, or none,
    where the system or the filesystem cannot)."""
    copy = getattr(os, "copy_file_range", None)
    done = 0
    try:
        while copy and done < length and (copied := copy(stream.fileno(), out.fileno(), length - done, offset + done)):
            done += copied
    except OSError:
        pass
    return done


def _nested_tensors(model):
    """Every tensor of ``model`` but its main graph's initializers: node attributes (Constant
    values) and subgraphs', in the graph and in its functions."""
    def in_nodes(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from graph.initializer
                    yield from in_nodes(graph.node)

    yield from in_nodes(model.graph.node)
    for function in model.functions:
        yield from in_nodes(function.node)


def set_static_output_shapes(model_path: Path, shapes: dict[str, tuple[int, ...]],
                             free: dict[str, dict[int, str]] | None = None) -> None:
    """Write the known static shape of each graph output (tracing loses some, e.g. after Split);
    declare the ``free`` input dimensions (input -> axis -> name) symbolic."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    changed = False
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.name in shapes and [d.dim_value for d in dims] != list(shapes[out.name]):
            del dims[:]
            for size in shapes[out.name]:
                dims.add().dim_value = int(size)
            changed = True
    for tensor in model.graph.input:
        for axis, name in (free or {}).get(tensor.name, {}).items():
            dim = tensor.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = name
            changed = True
    if changed:
        onnx.save(model, str(model_path))


def describe_io(model_path: Path) -> tuple[dict, dict]:
    """Graph inputs and outputs as {name: (dtype name, shape)} (shapes static; -1 if symbolic)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)

    def info(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out[v.name] = (onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)
        return out

    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    return info(inputs), info(model.graph.output)


def onnx_outputs(model_path: Path, feeds: list[dict], outputs: list[str], in_process: bool = False,
                 workdir: Path | None = None) -> list[dict]:
    """ONNX Runtime's ``outputs`` of the model on each feed, in a child process (ONNX Runtime does
    not give memory back) that writes its files in ``workdir`` (default: a temporary folder)."""
    from sd2mnn.verification._pass import PassError, kernel_transforms_pay, run_pass

    threads = int(os.environ.get("SD2MNN_THREADS", "0") or 0)  # 0: ONNX Runtime's own choice
    size = sum(p.stat().st_size for p in Path(model_path).parent.iterdir() if p.is_file())
    with tempfile.TemporaryDirectory(prefix="sd2mnn-check-", dir=workdir) as tmp:
        try:
            results, _ = run_pass("onnxruntime", Path(model_path), list(feeds[0]), outputs, feeds, threads,
                                  not in_process, Path(tmp), kernel_transforms=kernel_transforms_pay(size))
        except PassError as err:
            raise Sd2MnnError(f"{model_path}: ONNX Runtime's check was killed or failed ({err}); free memory, or "
                              "export at a smaller --height/--width") from None
    return results


def max_abs_errors(got: dict, expected: dict) -> dict:
    """Per output of ``expected``: max |got - expected| (inf for a shape that differs)."""
    import numpy as np

    return {name: float(np.max(np.abs(got[name].astype(np.float64) - ref))) if got[name].shape == ref.shape
            else float("inf") for name, ref in expected.items()}


def check_onnx(model_path: Path, inputs: dict, expected: dict, in_process: bool = False) -> dict:
    """Max abs error of each ONNX output against ``expected`` numpy arrays, same inputs."""
    return max_abs_errors(onnx_outputs(model_path, [inputs], list(expected), in_process)[0], expected)


# ---------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------
def _validate_options(options: ExportOptions) -> None:
    if options.components is not None:
        unknown = [c for c in options.components if c not in KNOWN_COMPONENTS]
        if unknown or not options.components:
            raise InputError(f"--components: unknown {unknown}; choose from {', '.join(KNOWN_COMPONENTS)}")
    for name, value in (("height", options.height), ("width", options.width)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise InputError(f"--{name} {value}: must be a positive number of pixels")
    if options.frames is not None and (not isinstance(options.frames, int) or options.frames <= 0):
        raise InputError(f"--frames {options.frames}: must be a positive number of frames")
    if not 11 <= options.opset <= 20:
        raise InputError(f"--opset {options.opset}: use 14..20 (MNN's docs use 18)")


def _refuse_replacing_sources(onnx_dir: Path, *sources: Path | None) -> None:
    """ONNX_DIR is replaced as a whole (with --overwrite) and staged beside itself: it must not
    be, hold or lie inside what export reads."""
    target = onnx_dir.resolve()
    for source in sources:
        if source is None:
            continue
        if is_inside(source.resolve(), target):
            raise InputError(f"{onnx_dir}: holds {source}, which export reads; choose another ONNX_DIR outside it")
        if is_inside(target, source.resolve()):
            raise InputError(f"{onnx_dir}: lies inside {source}, which export reads; "
                             "choose another ONNX_DIR outside it")


def _prepare_target(onnx_dir: Path, overwrite: bool) -> None:
    if onnx_dir.exists() and not onnx_dir.is_dir():
        raise InputError(f"{onnx_dir}: exists and is not a folder; choose another ONNX_DIR")
    if onnx_dir.is_dir() and any(onnx_dir.iterdir()) and not overwrite:
        raise InputError(f"{onnx_dir}: exists and is not empty; pass --overwrite or another ONNX_DIR")
    above = next(p for p in onnx_dir.parents if p.exists())
    if not above.is_dir():
        raise InputError(f"{above}: a file, not a folder, so {onnx_dir} cannot be made in it; choose another ONNX_DIR")
    with os_errors_as_one_line(onnx_dir, "nothing was written"):
        onnx_dir.parent.mkdir(parents=True, exist_ok=True)


def export(model: str | Path, onnx_dir: str | Path, options: ExportOptions | None = None,
           progress: Progress | None = None) -> ExportReport:
    """Export the pipeline at ``model`` to ``onnx_dir`` and check each part; see the module doc."""
    options = options or ExportOptions()
    if options.vae is not None:
        options = replace(options, vae=Path(options.vae))  # a str from the Python API
    model, onnx_dir = Path(model), Path(onnx_dir)
    _validate_options(options)
    if not model.exists():
        raise InputError(f"{model}: not found; give a diffusers folder or a .safetensors/.ckpt file")
    if not is_diffusers_model(model):
        raise InputError(
            f"{model}: not a diffusers pipeline (no model_index.json) or a .safetensors/.ckpt file"
        )
    require_export_extra(loras=bool(options.loras))
    _refuse_replacing_sources(onnx_dir, model, options.config, options.vae)
    # Everything export reads is checked before anything is written or loaded.
    if model.is_dir():
        checked = _open_source(model, options.components)
    else:
        checkpoint.require_config(model, options.config)
        checked = _open_source(options.config, options.components)
    if options.vae is not None:
        diffusers_folder.check_vae(options.vae, checked.family)
    say = progress or (lambda component, message: None)
    loras = []
    if options.loras:
        names = _component_names(checked, options.components, lambda *_: None, options.default_components_only)
        with _quiet_libraries():
            loras = _check_loras(replace(checked, loras=options.loras), names)
    _prepare_target(onnx_dir, options.overwrite)

    with os_errors_as_one_line(onnx_dir, f"{onnx_dir.name} is unchanged"):
        work = _staging_folder(onnx_dir)
        try:
            with _quiet_libraries():
                report = _export_staged(model, work, onnx_dir, options, say, loras)
            staged = work / "onnx"
            _move_into_place(staged, onnx_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    for comp in report.components:
        comp.path = onnx_dir / comp.path.relative_to(staged)
    return report


def _staging_folder(onnx_dir: Path) -> Path:
    """A hidden folder beside ONNX_DIR that the export is written in, then renamed from."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{onnx_dir.name}.export-", dir=onnx_dir.parent))
    except OSError as err:
        err.filename = str(onnx_dir.parent)  # the user's folder, not the name tried in it
        raise


def _export_staged(model: Path, work: Path, onnx_dir: Path, options: ExportOptions,
                   say: Progress, loras: list[lora.LoraRecord]) -> ExportReport:
    if model.is_dir():
        source = _open_source(model, options.components)
    else:
        say("checkpoint", f"loading {model.name} with config {options.config}")
        folder = checkpoint.materialize(model, options.config, work, options.components, say, options.memory_budget)
        # Written by materialize from the checked --config folder, whose own weights it links to.
        source = _open_source(folder, options.components, confine=False)
    vae = {}
    if options.vae is not None:
        entry = source.family.model_folder("vae_decoder")
        folder = _with_vae(source.folder, options.vae, work / "pipeline", entry)
        # Links out of the checked pipeline and the checked --vae folder.
        source = _open_source(folder, options.components, confine=False)
        vae = {"folder": str(options.vae.resolve()), "class": source.component_class(entry)[1]}
        say("vae", f"{vae['class']} from {options.vae} in place of the pipeline's VAE")
    source = replace(source, loras=options.loras)
    family = source.family
    names = _component_names(source, options.components, say, options.default_components_only)
    staged = work / "onnx"
    staged.mkdir()
    length = family.text_length
    size = image_size(source.folder, options.height, options.width, family)
    options = replace(options, **dict(zip(("height", "width"), size)), frames=video_frames(options.frames, family))
    lengths = {n: family.prompt_formats[s.tokenizer].max_length for n, s in family.components.items() if s.prompt_ids}
    lengths.update(_exporter(family).text_lengths(source.folder))
    check_memory(source.folder, names, options.height, options.width, length, family, options.memory_budget, lengths,
                 options.frames)
    report = ExportReport(model, onnx_dir, source.kind, length, options.opset, height=options.height, width=options.width,
                          frames=options.frames or 0, loras=loras, vae=vae)
    for folder in family.prompt_formats:
        shutil.copytree(source.folder / folder, staged / folder)
    families.write_marker(staged, family, [r.to_dict() for r in loras], vae)
    for record in loras:
        say("lora", f"{record.file} at scale {record.scale:g} into {', '.join(record.components) or 'nothing exported'}")
    for name in names:
        report.components.append(_export_component(source, name, staged, options, length, say))
    return report


def _with_vae(folder: Path, vae: Path, view: Path, entry: str) -> Path:
    """A pipeline folder at ``view`` that is ``folder`` with ``vae`` as its VAE (model_index.json's
    ``entry``): links to each of ``folder``'s items but that one, which links to ``vae``, and a
    model_index.json naming its class."""
    view.mkdir()
    for item in folder.iterdir():
        if item.name not in (entry, "model_index.json"):
            (view / item.name).symlink_to(item.resolve())
    (view / entry).symlink_to(vae.resolve())
    index = read_json_object(folder / "model_index.json")
    index[entry] = ["diffusers", read_json_object(vae / "config.json")["_class_name"]]
    (view / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return view


def _component_names(source: _Source, wanted: tuple[str, ...] | None, say: Progress,
                     default_only: bool = False) -> list[str]:
    """The components to export, in export order: ``wanted``, else all of the family's (its
    default ones with ``default_only``) but an optional one the pipeline does not have (SD3 saved
    without T5)."""
    family = source.family
    order = _exporter(family).order
    if wanted is None:
        names = []
        for name in order:
            if default_only and not family.components[name].default:
                continue
            if family.components[name].runtime_optional and not source.has(name):
                say(name, "not in the pipeline: left out (MNN's runtime conditions on zeros without it)")
            else:
                names.append(name)
        return names
    foreign = [c for c in wanted if c not in order]
    if foreign:
        raise InputError(f"--components {','.join(foreign)}: not part of {_pipeline_name(family)} "
                         f"({source.folder}); choose from {','.join(order)}")
    return [c for c in order if c in wanted]


def _export_component(source: _Source, name: str, staged: Path, options: ExportOptions,
                      length: int, say: Progress) -> ComponentReport:
    import numpy as np
    import torch

    start = time.monotonic()
    say(name, "loading")
    job = _build_job(source, name, options, length)
    spec = source.family.components[name]
    path = staged / name / "model.onnx"
    # The check's inputs are verify's (sd2mnn.verification.references): ONNX Runtime's outputs on
    # them check the ONNX model against PyTorch's and serve verify as its references. Where they
    # can be made before the model exists (all but a text encoder, whose ids are checked against
    # its model's vocabulary), the trace runs on the first, and its outputs are PyTorch's.
    feeds = None
    if options.check and not spec.prompt_ids:
        feeds = _verify_feeds(staged, name, source.family, options.seed,
                              tuple(TensorSpec(n, tuple(t.shape), str(t.numpy().dtype)) for n, t in job.inputs.items()))
        if feeds:
            job = replace(job, inputs={n: torch.from_numpy(feeds[0][n]) for n in job.inputs})
    traced = []
    hook = job.module.register_forward_hook(lambda module, args, result: traced.append(result))
    say(name, "exporting")
    try:
        _torch_export(job, path, options.opset)
    except Exception as err:
        raise Sd2MnnError(f"{source.folder}: torch.onnx.export failed for {name} "
                          f"({type(err).__name__}: {err}); set SD2MNN_DEBUG=1 for details") from err
    finally:
        hook.remove()
    if options.check and feeds is None:
        feeds = _verify_feeds(staged, name, source.family, options.seed)
    inputs = feeds[0] if feeds else {n: t.numpy().copy() for n, t in job.inputs.items()}
    if traced and all(np.array_equal(inputs[n], t.numpy()) for n, t in job.inputs.items()):
        ref = traced[-1]
    else:
        with torch.no_grad():
            ref = job.module(*(torch.from_numpy(inputs[n]) for n in job.inputs))
    ref = ref if isinstance(ref, tuple) else (ref,)
    expected = {n: t.detach().numpy().copy() for n, t in zip(job.outputs, ref)}
    outputs = job.outputs
    traced.clear()
    del ref, job
    gc.collect()
    if spec.weights_file:
        consolidate_external_data(path, spec.weights_file)
    elif any(p.name != "model.onnx" for p in path.parent.iterdir()):
        # Over 2 GB the exporter writes external data; keep it in one file like the unet.
        consolidate_external_data(path, WEIGHTS_FILE)
    set_static_output_shapes(path, {n: a.shape for n, a in expected.items()},
                             _exporter(source.family).free_dims.get(name))
    ins, outs = describe_io(path)
    atol = (options.tolerances or {}).get(name, source.family.components[name].export_atol)
    comp = ComponentReport(name, path, ins, outs, tolerance=atol)
    if options.check:
        say(name, "checking against PyTorch" + (f", then {len(feeds) - 1} more of verify's inputs" if feeds else ""))
        got = onnx_outputs(path, feeds or [inputs], outputs, workdir=staged.parent)
        comp.max_abs_error = max_abs_errors(got[0], expected)
        failures = []
        for out_name, err in comp.max_abs_error.items():
            scale = max(1.0, float(abs(expected[out_name]).max()))
            if not err <= comp.tolerance * scale:
                failures.append(f"{out_name}: max abs error {err:.3g} > {comp.tolerance * scale:.3g}")
        if failures:
            raise ExportCheckError(
                f"{path}: ONNX disagrees with PyTorch ({'; '.join(failures)}); "
                f"try another --opset or report the model"
            )
        if feeds:
            references.save(staged, name, load_component(staged, name, source.family).files, feeds, got)
    comp.size_bytes = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    comp.seconds = time.monotonic() - start
    errs = ", ".join(f"{k} {v:.2g}" for k, v in comp.max_abs_error.items())
    say(name, f"done in {comp.seconds:.1f} s, {comp.size_bytes / 1e6:.1f} MB"
        + (f", max abs error {errs}" if errs else ""))
    return comp


def _verify_feeds(staged: Path, name: str, family: Family, seed: int, inputs=None) -> list[dict] | None:
    """The inputs sd2mnn verify will feed the component ``name`` (from the folder exported so far:
    a denoiser's text embeddings come from its text encoder's kept outputs; ``inputs``: its
    model's, before the model exists); None where they cannot be made (a denoiser exported
    without its text encoder)."""
    from sd2mnn.verification.verify import component_feeds

    try:
        return component_feeds(staged, name, family, seed, inputs=inputs)
    except InputError:
        return None


def _move_into_place(staged: Path, onnx_dir: Path) -> None:
    old = None
    with interrupts_deferred():  # between the renames the old ONNX_DIR sits in the staging folder
        if onnx_dir.exists():
            old = staged.parent / "old"
            os.replace(onnx_dir, old)
        try:
            os.replace(staged, onnx_dir)
        except OSError:
            if old is not None:
                os.replace(old, onnx_dir)
            raise
