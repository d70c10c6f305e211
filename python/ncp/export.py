"""``python -m ncp.export``: take a trained LoRA to other tools.

- Kohya format (the default): one ``.safetensors`` file with ``lora_unet_<module>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` per adapted module, the layout kohya's sd-scripts write and
  AUTOMATIC1111, ComfyUI, sd-scripts and diffusers' ``load_lora_weights`` read. Module names follow
  sd-scripts: SD1.5 keeps the diffusers names (``lora_unet_down_blocks_0_attentions_0_...``), SDXL uses
  the original (SGM) U-Net's names (``lora_unet_input_blocks_4_1_...``).
- ``--merge DIR``: a full diffusers pipeline folder with the LoRA fused into the U-Net weights (loads
  with ``from_pretrained`` alone, no LoRA step).

    python -m ncp.export outputs/default                 # -> outputs/default/lora_kohya.safetensors
    python -m ncp.export outputs/default/lora --out my_lora.safetensors --dtype fp16
    python -m ncp.export outputs/default --merge outputs/default/merged

The input is a run folder (its ``lora/``) or a LoRA folder written by ``ncp.models.save_lora``. The base
model (needed for SDXL's block names and for ``--merge``) is read from the run's checkpoint config
unless ``--model`` names it; a LoRA folder without its run's config needs ``--model``.

``--merge`` never overwrites: it refuses a folder that is not empty and the base model's own folder (or one
inside it), and writes into ``.DIR.tmp-PID`` beside the target, renamed to it when complete.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ncp.files import written_whole
from ncp.models import ModelLoadError, detect_kind, family, resolve_model_path
from ncp.pipelines import LORA_FILE, bind_pil_image_processors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """A LoRA or model this exporter cannot convert; the message says why."""


def find_lora_dir(path: str | Path) -> Path:
    """``path`` itself when it holds the LoRA file, else its ``lora/`` (a run folder)."""
    path = Path(path)
    for cand in (path, path / "lora"):
        if (cand / LORA_FILE).is_file():
            return cand
    raise ExportError(f"no {LORA_FILE} in {path} or {path / 'lora'}")


def run_model_path(lora_dir: Path) -> str | None:
    """model.path of the run the LoRA came from (its newest checkpoint's config.json), if there is one."""
    configs = sorted(lora_dir.parent.glob("step-*/config.json"))
    if not configs:
        return None
    return json.loads(configs[-1].read_text()).get("model", {}).get("path")


def base_model(lora_dir: Path, model: str | None) -> str:
    """``model`` if given, else the run's model.path; a LoRA whose run config is not beside it names no base
    model, and guessing one (the bundled model) would export a LoRA onto the wrong U-Net."""
    model = model or run_model_path(lora_dir)
    if model is None:
        raise ExportError(f"{lora_dir} has no run config beside it ({lora_dir.parent}/step-*/config.json) naming "
                          f"its base model; pass --model (a diffusers folder, hub id or 'bundle')")
    return model


def check_merge_target(model_path: str | Path, target: Path) -> None:
    """Refuse a ``--merge`` target that is the base model's folder or inside it (paths resolved, links
    followed), a file, or a folder that is not empty."""
    model_dir, out = Path(model_path).resolve(), target.resolve()
    if out == model_dir or out.is_relative_to(model_dir):
        where = "the base model's own folder" if out == model_dir else f"inside the base model's folder {model_dir}"
        raise ExportError(f"--merge {target} is {where}: refusing to write over the model; choose a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--merge {target} exists and is not an empty folder: refusing to write into it; "
                          f"choose a new or empty folder")


def read_lora(lora_dir: Path) -> tuple[dict[str, tuple[Tensor, Tensor]], float, int]:
    """{U-Net module path: (down (r, in, ...), up (out, r, ...))}, lora_alpha and rank of a diffusers-format
    LoRA. The rank and alpha come from the adapter config the file carries in its metadata."""
    from safetensors import safe_open

    with safe_open(str(lora_dir / LORA_FILE), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = {k.removeprefix("unet."): v for k, v in meta.items()}
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise ExportError(f"{lora_dir / LORA_FILE} carries no adapter config (rank, alpha) in its metadata")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ExportError(f"per-module {key} is not supported by the kohya format export")
    if cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ExportError("rsLoRA / DoRA adapters have no plain kohya LoRA equivalent")
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"unet\.(.+)\.lora(?:\.|_)(down|up|A|B)(?:\.default)?\.weight", key)
        if m is None:
            raise ExportError(f"unexpected key {key} (ncp LoRAs adapt the U-Net only)")
        part = {"A": "down", "B": "up"}.get(m[2], m[2])
        modules.setdefault(m[1], {})[part] = value
    for name, parts in modules.items():
        if parts.keys() != {"down", "up"}:
            raise ExportError(f"{lora_dir / LORA_FILE}: module {name} has its lora {', '.join(parts)} weight only")
    return {k: (v["down"], v["up"]) for k, v in modules.items()}, float(cfg["lora_alpha"]), int(cfg["r"])


def sgm_module_name(module: str, unet_config: dict[str, Any]) -> str:
    """A diffusers U-Net module path in the original (SGM) U-Net's naming, the inverse of diffusers'
    ``_maybe_map_sgm_blocks_to_diffusers`` + ``_convert_unet_lora_key``: ``down_blocks.1.attentions.0.x`` ->
    ``input_blocks.4.1.x`` (two layers per block), resnet convs -> in_layers / out_layers, etc."""
    lpb = unet_config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ExportError("a per-block layers_per_block has no SGM block numbering")
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2"}
    if module in top:
        return top[module]
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)",
                     module) or re.fullmatch(r"(mid_block)\.()(resnets|attentions)\.(\d+)\.(.+)", module)
    if m is None:
        raise ExportError(f"no SGM name for U-Net module {module}")
    where, block, inner, layer, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
    if inner == "resnets":
        rest = ".".join([resnet.get(rest.split(".")[0], rest.split(".")[0]), *rest.split(".")[1:]])
    if where == "mid_block":
        return f"middle_block.{1 if inner == 'attentions' else 2 * layer}.{rest}"
    if where == "down_blocks":
        if inner == "downsamplers":
            return f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op"
        return f"input_blocks.{1 + block * (lpb + 1) + layer}.{0 if inner == 'resnets' else 1}.{rest}"
    if inner == "upsamplers":
        has_attention = "CrossAttn" in unet_config["up_block_types"][block]
        return f"output_blocks.{block * (lpb + 1) + lpb}.{2 if has_attention else 1}.conv"
    return f"output_blocks.{block * (lpb + 1) + layer}.{0 if inner == 'resnets' else 1}.{rest}"


def to_kohya(modules: dict[str, tuple[Tensor, Tensor]], alpha: float, kind: str, unet_config: dict[str, Any],
             dtype: torch.dtype) -> dict[str, Tensor]:
    """The kohya state dict: ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
    kohya scales ``up @ down`` by ``alpha / rank``, as peft does by ``lora_alpha / r``: the same update."""
    out = {}
    for module, (down, up) in sorted(modules.items()):
        name = sgm_module_name(module, unet_config) if family(kind).kohya_names == "sgm" else module
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def unet_family(model_path: str) -> str:
    """The model's family, which must have a U-Net: the kohya names and the merge are written for those (the
    flow transformers' LoRAs load as they are, with their pipeline's ``load_lora_weights``)."""
    kind = detect_kind(model_path)
    fam = family(kind)
    if fam.denoiser != "unet":
        raise ExportError(f"export: {model_path} is a {kind} model; the kohya and merged exports are written for "
                          f"the U-Net families (sd15, sdxl). Its LoRA folder loads as it is: "
                          f"{fam.pipeline}.from_pretrained(...).load_lora_weights(<run>/lora)")
    return kind


def export_kohya(lora_dir: Path, model: str, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    model_path = resolve_model_path(model)
    kind = unet_family(model_path)
    unet_config = dict(UNet2DConditionModel.load_config(model_path, subfolder="unet"))
    modules, alpha, rank = read_lora(lora_dir)
    state = to_kohya(modules, alpha, kind, unet_config, dtype)
    # sd-scripts' own metadata keys (A1111 and ComfyUI show them; loading does not need them)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": family(kind).kohya_base_model,
            "ncp_source": str(lora_dir.resolve())}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    return out


def fuse_into(unet: torch.nn.Module, modules: dict[str, tuple[Tensor, Tensor]], alpha: float, rank: int) -> None:
    """``W += alpha / rank * up @ down`` for every adapted module (conv kernels: over the flattened kernel),
    in float32. Done here rather than with diffusers' ``fuse_lora``: diffusers 0.42's ``load_lora_weights``
    drops the attention layers of a diffusers-format LoRA that also adapts other layers."""
    named = dict(unet.named_modules())
    for module, (down, up) in modules.items():
        if module not in named:
            raise ExportError(f"the LoRA adapts {module}, which this U-Net does not have")
        weight = named[module].weight
        delta = (up.flatten(1).float() @ down.flatten(1).float()).view(weight.shape) * (alpha / rank)
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))


def export_merged(lora_dir: Path, model: str, out_dir: Path) -> Path:
    """The base pipeline with the LoRA fused into its U-Net weights, saved whole (no adapter left) into a
    temporary folder beside ``out_dir`` and renamed to it at the end (``out_dir``: new or empty)."""
    model_path = resolve_model_path(model)
    unet_family(model_path)
    check_merge_target(model_path, out_dir)
    bind_pil_image_processors()
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_path)
    fuse_into(pipe.unet, *read_lora(lora_dir))
    with written_whole(out_dir) as tmp:
        pipe.save_pretrained(str(tmp))
        check_merge_target(model_path, out_dir)  # still new or empty
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ncp.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lora", help="a run folder (its lora/) or a LoRA folder written by ncp.train")
    p.add_argument("--model", help="base model: diffusers folder, hub id or 'bundle' (default: the run's model.path; "
                                   "required for a LoRA folder without its run)")
    p.add_argument("--out", help="kohya file (default: <lora folder>_kohya.safetensors beside the LoRA folder)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of the kohya file's tensors")
    p.add_argument("--merge", metavar="DIR", help="also write a full diffusers pipeline with the LoRA fused into DIR "
                                                  "(a new or empty folder, not the base model's)")
    args = p.parse_args(argv)
    try:
        lora_dir = find_lora_dir(args.lora)
        model = base_model(lora_dir, args.model)
        if args.merge:  # refused before anything is written
            check_merge_target(resolve_model_path(model), Path(args.merge))
        out = Path(args.out) if args.out else lora_dir.parent / f"{lora_dir.name}_kohya.safetensors"
        print(f"kohya LoRA: {export_kohya(lora_dir, model, out, DTYPES[args.dtype])}")
        if args.merge:
            print(f"merged pipeline: {export_merged(lora_dir, model, Path(args.merge))}")
    except (ExportError, ModelLoadError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
