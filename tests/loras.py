"""LoRAs for the tiny pipelines, made as their users' tools make them: PEFT adapters with seeded
non-zero weights saved by diffusers' ``save_lora_weights`` (diffusers/PEFT keys, PEFT's config in the
file's metadata), and the same weights rewritten as kohya's sd-scripts writes an SD1.x LoRA
(``lora_unet_*``/``lora_te_*`` modules, ``lora_down``/``lora_up``/``alpha``, float16)."""
from __future__ import annotations

from pathlib import Path

# sd-scripts' networks/lora.py: every Linear and 1x1 Conv2d inside these modules.
KOHYA_UNET_MODULES = ("Transformer2DModel",)
KOHYA_TEXT_MODULES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def _lora_config(targets, rank: int, alpha: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)


def _inside(model, classes) -> list[str]:
    """The Linear and 1x1 Conv2d layers inside modules of ``classes``, by full name."""
    import torch

    names = []
    for outer_name, outer in model.named_modules():
        if type(outer).__name__ not in classes:
            continue
        for inner_name, inner in outer.named_modules():
            fits = isinstance(inner, torch.nn.Linear) or (isinstance(inner, torch.nn.Conv2d)
                                                         and inner.kernel_size == (1, 1))
            if inner_name and fits:
                names.append(f"{outer_name}.{inner_name}" if outer_name else inner_name)
    return sorted(set(names))


def _adapter(model, targets, rank: int, alpha: int, seed: int, text: bool):
    """``model``'s state dict of a PEFT LoRA on ``targets`` with seeded weights, and its config."""
    import torch
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    config = _lora_config(targets, rank, alpha)
    torch.manual_seed(seed)
    if text:
        inject_adapter_in_model(config, model)
    else:
        model.add_adapter(config)
    return get_peft_model_state_dict(model), config.to_dict()


def make_sd15_lora(pipeline_dir: Path, out_file: Path, seed: int = 1, kohya_targets: bool = False,
                   rank: int = 4, alpha: int = 8) -> Path:
    """A PEFT LoRA on the unet's attention layers and the CLIP's q/v projections (kohya_targets:
    on what sd-scripts targets), saved with diffusers' ``save_lora_weights``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir / "unet"))
    text = CLIPTextModel.from_pretrained(str(pipeline_dir / "text_encoder"))
    unet_targets = _inside(unet, KOHYA_UNET_MODULES) if kohya_targets else ["to_q", "to_k", "to_v", "to_out.0"]
    text_targets = _inside(text, KOHYA_TEXT_MODULES) if kohya_targets else ["q_proj", "v_proj"]
    unet_state, unet_config = _adapter(unet, unet_targets, rank, alpha, seed, text=False)
    text_state, text_config = _adapter(text, text_targets, rank, alpha, seed + 1, text=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        str(out_file.parent), unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
        weight_name=out_file.name, unet_lora_adapter_metadata=unet_config,
        text_encoder_lora_adapter_metadata=text_config)
    return out_file


def make_sd3_lora(pipeline_dir: Path, out_file: Path, seed: int = 1, rank: int = 4, alpha: int = 8) -> Path:
    """A PEFT LoRA on the MMDiT's attention layers and both CLIPs' q/v projections."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel.from_pretrained(str(pipeline_dir / "transformer"))
    layers = {"transformer_lora_layers": _adapter(transformer, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                                "add_k_proj", "add_v_proj"], rank, alpha, seed,
                                                  text=False)}
    for offset, name in enumerate(("text_encoder", "text_encoder_2"), start=1):
        model = CLIPTextModelWithProjection.from_pretrained(str(pipeline_dir / name))
        layers[f"{name}_lora_layers"] = _adapter(model, ["q_proj", "v_proj"], rank, alpha, seed + offset, text=True)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        str(out_file.parent), weight_name=out_file.name,
        **{key: state for key, (state, _) in layers.items()},
        **{key.replace("_layers", "_adapter_metadata"): config for key, (_, config) in layers.items()})
    return out_file


def to_kohya(diffusers_file: Path, out_file: Path) -> Path:
    """``diffusers_file`` (an SD1.x LoRA saved by ``make_sd15_lora``) as sd-scripts writes it:
    ``lora_unet_<diffusers unet path>`` and ``lora_te_<transformers 4 CLIP path>`` with ``_`` for ``.``,
    ``lora_down``/``lora_up`` weights in float16 and each module's ``alpha``."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(diffusers_file), "pt") as f:
        configs = json.loads(f.metadata()["lora_adapter_metadata"])
    kohya = {}
    for key, value in load_file(str(diffusers_file)).items():
        part, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        if part == "unet":
            name = "lora_unet_" + module.replace(".", "_")
        else:  # transformers 4 named CLIPTextModel's layers text_model.*, as sd-scripts saw them
            name = "lora_te_text_model_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.to(torch.float16)
        kohya[f"{name}.alpha"] = torch.tensor(float(configs[f"{part}.lora_alpha"]), dtype=torch.float16)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(out_file), metadata={"ss_network_module": "networks.lora"})
    return out_file


def make_wan_lora(pipeline_dir: Path, out_file: Path, seed: int = 1, rank: int = 4, alpha: int = 8) -> Path:
    """A PEFT LoRA on the Wan transformer's attention layers, saved by WanPipeline's save_lora_weights."""
    from diffusers import WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(str(pipeline_dir / "transformer"))
    state, config = _adapter(transformer, ["to_q", "to_k", "to_v", "to_out.0"], rank, alpha, seed, text=False)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    WanPipeline.save_lora_weights(str(out_file.parent), transformer_lora_layers=state, weight_name=out_file.name,
                                  transformer_lora_adapter_metadata=config)
    return out_file
