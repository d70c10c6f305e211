"""The U-Net families (SD1.x/2.x, SDXL): DDPM noise, a ``UNet2DConditionModel`` denoiser, and its encoder half
(conv_in, the down blocks, the mid block) as the perceptual encoder."""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from ncp.families.base import Conditioning, Family
from ncp.schedule import NoiseSchedule

Tap = Union[int, str]  # a down block index, "conv_in" or "mid"
TAP_PRESETS = ("auto", "paper", "mid", "multiscale", "authors")


class UNetFamily(Family):
    """What SD1.5 and SDXL share: the denoiser call, the DDPM schedule, the taps, the LoRA format."""

    denoiser = "unet"
    denoiser_class = "UNet2DConditionModel"
    scheduler_class = "DDPMScheduler"
    compile_regions = ("ResnetBlock2D", "BasicTransformerBlock")

    def training_schedule(self, scheduler, device: torch.device, sigma_sampling: str = "logit_normal"):
        return NoiseSchedule.from_scheduler(scheduler, device)  # DDPM: timesteps uniform, ``sigma_sampling`` unused

    def denoise(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        return model(x, timestep, encoder_hidden_states=cond.hidden_states,
                     added_cond_kwargs=cond.added_cond_kwargs()).sample

    def tap_units(self, model: nn.Module) -> int:
        return len(model.down_blocks)

    def resolve_taps(self, spec: list[str], units: int) -> list[Tap]:
        return resolve_unet_taps(spec, self.tap_presets, units)

    def encoder_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Conditioning,
                         taps: list[Tap]) -> list[Tensor]:
        return encoder_features(model, x, timestep, cond, taps)

    def lora_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The adapter weights in the diffusers U-Net LoRA format (``…lora.down/up.weight``)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))

    def peft_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        from diffusers.utils import convert_unet_state_dict_to_peft

        return convert_unet_state_dict_to_peft(state)


def resolve_unet_taps(spec: list[str], presets: dict[str, str], num_down_blocks: int) -> list[Tap]:
    """Expand a preset or explicit list into "conv_in", down block indices and/or "mid", in forward order;
    ``presets`` says what "auto" and "authors" mean for the family (the authors: SD1.5 all scales, SDXL the last
    down block)."""
    if len(spec) == 1 and spec[0] in TAP_PRESETS:
        preset = presets.get(spec[0], spec[0])
        return {"paper": [num_down_blocks - 1], "mid": ["mid"], "multiscale": [*range(num_down_blocks), "mid"],
                "authors": ["conv_in", *range(num_down_blocks), "mid"]}[preset]
    taps: list[Tap] = []
    for item in spec:
        if item in ("mid", "conv_in"):
            taps.append(item)
        elif str(item).lstrip("-").isdigit() and 0 <= int(item) < num_down_blocks:
            taps.append(int(item))
        else:
            raise ValueError(f"objective.taps: {item!r} is neither a preset ({', '.join(TAP_PRESETS)}), "
                             f"'conv_in', 'mid', nor a down block index in 0..{num_down_blocks - 1}")
    if len(set(taps)) != len(taps):
        raise ValueError(f"objective.taps lists a tap twice: {spec}")
    return sorted(taps, key=lambda t: _tap_order(t, num_down_blocks))


def _tap_order(tap: Tap, num_down_blocks: int) -> int:
    return -1 if tap == "conv_in" else num_down_blocks if tap == "mid" else int(tap)


def encoder_features(unet: nn.Module, sample: Tensor, timestep: Tensor, cond: Conditioning,
                     taps: list[Tap]) -> list[Tensor]:
    """E(x, t, c): the U-Net's conv_in (a tap of its own), time/added embeddings, down blocks and (if tapped)
    the mid block.

    Mirrors ``UNet2DConditionModel.forward`` and stops after the last tap. Returns
    the tapped activations in the order of ``taps``. Call it with adapters
    disabled to get the frozen base encoder.
    """
    ehs = cond.hidden_states
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=cond.added_cond_kwargs())
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=cond.added_cond_kwargs())
    h = unet.conv_in(sample)
    found: dict[Tap, Tensor] = {"conv_in": h}
    last = max(_tap_order(t, len(unet.down_blocks)) for t in taps)
    for i, block in enumerate(unet.down_blocks[: last + 1]):
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        found[i] = h
    if "mid" in taps:
        if getattr(unet.mid_block, "has_cross_attention", False):
            found["mid"] = unet.mid_block(h, emb, encoder_hidden_states=ehs)
        else:
            found["mid"] = unet.mid_block(h, emb)
    return [found[t] for t in taps]
