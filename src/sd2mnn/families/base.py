"""What a model family is: its components and their tensors, its prompt format, how its export
is checked, how verify feeds it, and how MNN's runtime draws with it. One frozen dataclass per
family (as optimum keeps one OnnxConfig per architecture), so the engines ask the family instead
of branching on a component's name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sd2mnn.tokenization.reader import PromptFormat

# The image VAEs an image family loads: diffusers' AutoencoderKL, and the tiny one (TAESD's
# architecture) that phones decode with.
IMAGE_VAES = (("diffusers", "AutoencoderKL"), ("diffusers", "AutoencoderTiny"))

# (dtype, shape) per tensor name; None in a shape is a dimension the runtime leaves free.
TensorShapes = dict[str, tuple[str, list]]


@dataclass(frozen=True)
class ComponentSpec:
    """A pipeline component: the tensor names MNN's runtime loads it with, the shapes it fixes,
    how verify feeds it and how closely its ONNX export must follow PyTorch."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    default: bool  # converted unless --components says otherwise
    # (text length, text hidden size) -> the runtime's fixed tensors; empty when the runtime
    # never loads the component.
    runtime_tensors: Callable[[int, int | None], TensorShapes] = field(default=lambda length, hidden: {}, compare=False)
    # (shapes, dtypes, rng, prompt ids, text embeddings, cases) -> (feeds, what they are).
    verify_feeds: Callable | None = field(default=None, compare=False)
    verify_cases: int = 1
    export_atol: float = 1e-3  # |onnx - torch| <= atol * max(1, max |torch|)
    # The one external-data file export gathers the weights into ("" : inline, unless over 2 GB).
    weights_file: str = ""
    # Its part in the pipeline, for the engines that chain components:
    prompt_ids: bool = False  # fed the tokenizer's ids (verify and bench make them first)
    conditioning_output: str = ""  # the output the denoiser is conditioned on
    conditioned: bool = False  # takes the text encoder's conditioning_output
    picture_output: str = ""  # the image verify's report draws
    # Added for families whose runtime shapes depend on several model widths (SD3.5): the tensors
    # as a function of the family's dims object; runtime_tensors then gives the runtime's own.
    shapes: Callable[[object], TensorShapes] | None = field(default=None, compare=False)
    tokenizer: str = "tokenizer"  # the tokenizer folder whose ids it is fed (when prompt_ids)
    runtime_optional: bool = False  # the runtime runs without it (SD3.5's T5: zeros instead)
    # Its conditioning is zero past the prompt's ids, as diffusers masks and zeroes it (Wan's
    # UMT5); verify's conditioning check holds the bundle to it.
    zeroes_padding: bool = False

    @property
    def mnn_name(self) -> str:
        return f"{self.name}.mnn"

    @property
    def weight_name(self) -> str:
        # The runtime derives the weight file's name from the model's: "<model>.mnn.weight".
        return f"{self.name}.mnn.weight"

    @property
    def compression_name(self) -> str:
        """The per-layer bits it was converted with (MNN's --compressionParamsFile), when it was."""
        return f"{self.name}.compression.json"

    def output_names(self, compressed: bool = False) -> tuple[str, ...]:
        """The bundle files a conversion of it writes."""
        return (self.mnn_name, self.weight_name, *((self.compression_name,) if compressed else ()))


@dataclass(frozen=True)
class Recipe:
    """How MNN's runtime draws an image with the family."""

    scheduler: str  # a name in sd2mnn.schedulers.SCHEDULERS
    guidance: float
    latent_scale: float  # the decoder's input is latents * float32(latent_scale)
    latent_shape: tuple[int, ...]
    image_size: int
    latent_shift: float = 0.0  # added after the scaling (SD3.5's VAE shift factor)
    # The runtime draws image_size only, whatever size the models were exported at (a refused
    # --height/--width says so); False where it follows the models' sizes.
    draws_only_image_size: bool = False
    # A video family's frames by default (0: an image family) and what they must be 1 more than a
    # multiple of (the VAE's temporal factor).
    frames: int = 0
    frames_step: int = 1
    # The scheduler diffusers' pipeline for the family steps with (generate --schedule diffusers),
    # a name in sd2mnn.schedulers.SCHEDULERS; "": the runtime's is diffusers' (SD1.5's PLMS).
    diffusers_scheduler: str = ""
    # How that scheduler departs from the runtime's, for the notes of an image drawn with it.
    diffusers_departure: str = ""


@dataclass(frozen=True)
class SameSize:
    """Dimensions of two components' tensors that must agree because the runtime hands one
    model's tensor to the other sized from its own arguments, checking neither (Wan's latents and
    text width: the graphs were traced at one size, and a part exported at another runs wrongly
    or crashes)."""

    first: tuple[str, str]  # (component, tensor)
    second: tuple[str, str]
    axes: tuple[int, ...]  # the same axes of both
    what: str  # how a message names them ("latent frames, height and width")


@dataclass(frozen=True)
class SingleFileLayout:
    """Where an original-layout single-file checkpoint (CompVis's SD1.x files, Stability's SD3
    files) keeps each diffusers model: its keys' prefixes per model folder, and a key part that
    only the family's denoiser has (what tells an SD1 file from an SD3 one)."""

    prefixes: dict[str, tuple[str, ...]]
    denoiser_marker: str


@dataclass(frozen=True)
class Family:
    name: str
    prompt: PromptFormat
    tokenizer_model: str  # the tokenizer.json model kind that marks the family ("BPE", "WordPiece")
    components: dict[str, ComponentSpec]
    runtime_components: tuple[str, ...]  # the ones MNN's runtime loads, in run order
    recipe: Recipe
    check_prompts: tuple[str, ...]  # what export's fidelity check encodes
    # Tokenizer folder -> its format, for a family with several (SD3.5); empty: {"tokenizer": prompt}.
    tokenizers: dict[str, PromptFormat] = field(default_factory=dict)
    denoiser: str = "unet"  # the component the scheduler steps with (its diffusers folder too)
    single_file: SingleFileLayout | None = None  # None: no single-file checkpoints
    # model_index.json entry -> the (library, class) pairs export loads it as, the first the
    # default; any other is refused, so a model folder never picks the code that reads it.
    classes: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    pipelines: tuple[str, ...] = ()  # model_index.json's _class_name for the family's diffusers folders
    title: str = ""  # how messages name the family's models ("a Stable Diffusion 3 checkpoint")
    # The modules that hold the family's code, imported by name only when needed (the exporter
    # imports torch): ``steps_module`` defines STEPS (sd2mnn.recipes), ``exporter_module`` EXPORTER
    # (sd2mnn.exporters).
    steps_module: str = ""
    exporter_module: str = ""
    # Generated images' metadata names the family; SD1.5's never did, so its images keep saying nothing.
    named_in_metadata: bool = True
    # Its runtime fixes the text length and widths itself (SD3.5, Wan): the components' runtime
    # tensors say them all. False: MNN's SD1.x runtime, which takes them from the text encoder.
    fixed_widths: bool = False
    # Dimensions the runtime leaves free but the components must share (checked by verify's
    # contract and before generate draws).
    same_sizes: tuple[SameSize, ...] = ()

    @staticmethod
    def model_folder(component: str) -> str:
        """The diffusers folder a component is exported from (vae_encoder, vae_decoder: vae)."""
        return "vae" if component.startswith("vae") else component

    @property
    def prompt_formats(self) -> dict[str, PromptFormat]:
        """Tokenizer folder -> the format MNN's runtime encodes its prompts with."""
        return dict(self.tokenizers) or {"tokenizer": self.prompt}

    @property
    def default_components(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.components.items() if s.default)

    @property
    def text_encoder(self) -> str:
        """The component fed the prompt ids."""
        return next(n for n, s in self.components.items() if s.prompt_ids)

    @property
    def text_length(self) -> int:
        return self.prompt.max_length
