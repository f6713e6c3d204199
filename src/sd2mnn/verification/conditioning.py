"""verify's conditioning check: does MNN's runtime, with this bundle, condition as diffusers does?

Two chains per prompt: the ids MNN's runtime feeds (the bundle's tokenizer.mtok) through the
bundle's text encoder on MNN, against Hugging Face's ids (the bundle's tokenizer files, as diffusers
tokenizes) through the original ONNX text encoder on ONNX Runtime. It reports the share of prompts
whose ids (as the CLIP model sees them) equal Hugging Face's, the share of token positions, and the
worst cosine between the two chains' ``last_hidden_state``. Where diffusers zeroes the states past
the prompt (Wan), the bundle's must be zero there too: a text encoder exported without the mask
(MNN's own Wan exporter) attends to the padding instead. A family with several text encoders
(SD3.5's CLIP-L and CLIP-G) is checked per text encoder, each with its own tokenizer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from sd2mnn.core.files import read_user_text
from sd2mnn.core.layout import bundle_mtok
from sd2mnn.errors import InputError
from sd2mnn.families import Family
from sd2mnn.tokenization.prompt_ids import PromptIds

# Below what a default bundle reaches on the built-in prompts (README: "Conditioning": 98.5% of
# prompts with SD1.5's tokenizer, 97.7% with the demo's 130-merge one); a bundle converted with
# --tokenizer-scheme mnn is reported, not judged: it conditions as MNN's own flow does (0%).
MIN_PROMPT_SHARE = 0.95
MIN_POSITION_SHARE = 0.99
# Where the ids agree, the two chains differ only by the conversion (and the id rewrite on MNN).
MIN_MATCHING_COSINE = 0.999
# Text embeddings are compared for the first prompts whose ids differ (what the difference costs)
# and a few whose ids agree: enough to bound the cosine without running every prompt twice.
EMBEDDED_DIFFERING = 64
EMBEDDED_MATCHES = 8


def builtin_prompts() -> list[str]:
    text = resources.files("sd2mnn").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line]


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (kept as written, trailing spaces included); blank lines skipped."""
    text = read_user_text(path, "prompts", "give a UTF-8 text file, one prompt per line")
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts; write one prompt per line")
    return prompts


@dataclass
class ConditioningReport:
    tokenizer_scheme: str  # the bundle's: "diffusers" or "mnn"
    prompts: int
    identical_prompts: int
    positions: int
    identical_positions: int
    worst_cosine: float | None  # over every prompt compared
    worst_prompt: str | None
    matching_cosine: float | None  # the worst over prompts whose ids agree
    embedded: int = 0  # prompts whose text embeddings were compared
    differing: list[str] = field(default_factory=list)  # prompts whose ids differ
    component: str = "text_encoder"  # the text encoder checked (with its tokenizer)
    label: str = "conditioning"  # how the report names it (the family's first text encoder: plainly)
    # The cosine where the ids agree must reach: MIN_MATCHING_COSINE for float weights; for
    # quantized ones, the component's own limit (its weights' error is not the tokenizer's).
    min_matching_cosine: float = MIN_MATCHING_COSINE
    # The largest |state| past the prompt's ids on MNN, where diffusers zeroes them; None: a text
    # encoder whose padded states diffusers keeps.
    padding_max: float | None = None

    @property
    def prompt_share(self) -> float:
        return self.identical_prompts / self.prompts if self.prompts else 1.0

    @property
    def position_share(self) -> float:
        return self.identical_positions / self.positions if self.positions else 1.0

    @property
    def failures(self) -> list[str]:
        if self.tokenizer_scheme != "diffusers":
            return []
        out = []
        if self.prompt_share < MIN_PROMPT_SHARE:
            out.append(f"{self.label}: {self.prompt_share:.1%} of prompts get diffusers' ids < {MIN_PROMPT_SHARE:.0%}")
        if self.position_share < MIN_POSITION_SHARE:
            out.append(f"{self.label}: {self.position_share:.2%} of token positions agree < {MIN_POSITION_SHARE:.0%}")
        if self.matching_cosine is not None and self.matching_cosine < self.min_matching_cosine:
            out.append(f"{self.label}: the text encoder on MNN gives cosine {self.matching_cosine:.6f} < "
                       f"{self.min_matching_cosine:g} against ONNX Runtime for the same ids; reconvert the text encoder")
        if self.padding_max:  # nonzero, or NaN
            out.append(f"{self.label}: the text encoder's states past the prompt are not zero (max |x| "
                       f"{self.padding_max:.3g}): it attends to the padding, where diffusers masks it and zeroes them; "
                       "export the text encoder with sd2mnn export")
        return out

    def summary(self) -> str:
        cosine = f"{self.worst_cosine:.6f}" if self.worst_cosine is not None else "-"
        note = "" if self.tokenizer_scheme == "diffusers" else " (bundle converted with --tokenizer-scheme mnn: not judged)"
        padding = "" if self.padding_max is None else f"; states past the prompt max |x| {self.padding_max:.3g}"
        return (f"{self.label} ({self.tokenizer_scheme}): {self.identical_prompts}/{self.prompts} prompts "
                f"({self.prompt_share:.1%}) and {self.position_share:.2%} of token positions get diffusers' ids; "
                f"worst text-embedding cosine {cosine} of {self.embedded} compared (for {self.worst_prompt!r}){padding}{note}")

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["label"], data["min_matching_cosine"]  # both shown in the failures they lead to
        data.update(prompt_share=self.prompt_share, position_share=self.position_share, failures=self.failures)
        return data


def check_conditioning(onnx_dir: Path, mnn_dir: Path, prompts: list[str] | None = None, threads: int = 2,
                       isolate: bool = False, workdir: Path | None = None, *, family: Family,
                       component: str | None = None, tokenizer_scheme: str | None = None,
                       min_matching_cosine: float = MIN_MATCHING_COSINE) -> ConditioningReport:
    """Check ``component`` (a text encoder of ``family``) with its tokenizer. ``isolate``: run
    each runtime in a child process (in ``workdir``), as verify does for big models. ``tokenizer_scheme``:
    the bundle's, as its manifest records it (default: what its .mtok shows, which only CLIP's
    end-of-word .mtok does; T5's diffusers scheme changes no text encoder to show it by)."""
    import tempfile

    from sd2mnn.verification._pass import run_pass
    prompts = prompts if prompts is not None else builtin_prompts()
    component = component or family.text_encoder
    ids = PromptIds.for_bundle((Path(mnn_dir) / bundle_mtok(family, component)).parent,
                              family.prompt_formats[family.components[component].tokenizer])
    length = ids.max_length
    runtime = [ids.runtime_pair(p, length) for p in prompts]
    seen = [ids.seen_pair(r) for r in runtime]
    expected = [ids.hf_pair(p, length) for p in prompts]
    fed = [ids.graph_feed(e) for e in expected]  # the ONNX graph's model then sees diffusers' ids
    same = [bool((s[1] == e[1]).all()) for s, e in zip(seen, expected)]
    positions = sum(int((s[1] == e[1]).sum()) for s, e in zip(seen, expected))

    chosen = ([i for i, ok in enumerate(same) if not ok][:EMBEDDED_DIFFERING]
              + [i for i, ok in enumerate(same) if ok][:EMBEDDED_MATCHES])
    spec = family.components[component]
    names = (list(spec.inputs), list(spec.outputs))
    with tempfile.TemporaryDirectory(prefix="sd2mnn-conditioning-", dir=workdir) as tmp:
        reference, _ = run_pass("onnxruntime", Path(onnx_dir) / component / "model.onnx", *names,
                                [{"input_ids": fed[i]} for i in chosen], threads, isolate, Path(tmp))
        device, _ = run_pass("mnn", Path(mnn_dir) / spec.mnn_name, *names,
                             [{"input_ids": runtime[i]} for i in chosen], threads, isolate, Path(tmp))
    worst, worst_prompt, matching = None, None, None
    for i, ref, got in zip(chosen, reference, device):
        a = ref[spec.conditioning_output][1].ravel().astype(np.float64)
        b = got[spec.conditioning_output][1].ravel().astype(np.float64)
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
        if worst is None or cosine < worst:
            worst, worst_prompt = cosine, prompts[i]
        if same[i]:
            matching = cosine if matching is None else min(matching, cosine)
    padding = None
    if spec.zeroes_padding:  # both prompts of each pair, at the ids the model saw as padding (0)
        padding = max((float(np.nan_to_num(np.abs(got[spec.conditioning_output][row][seen[i][row] == 0]),
                                           nan=np.inf).max(initial=0.0))
                       for i, got in zip(chosen, device) for row in (0, 1)), default=0.0)
    return ConditioningReport(tokenizer_scheme or ids.tokenizer_scheme, len(prompts), sum(same), len(prompts) * length, positions, worst,
                              worst_prompt, matching, len(chosen), [p for p, ok in zip(prompts, same) if not ok],
                              component, "conditioning" if component == family.text_encoder
                              else f"conditioning of {component}", min_matching_cosine, padding)

