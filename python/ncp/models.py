"""Model loading (SD1.5 family and SDXL), LoRA adapters, text conditioning and the perceptual encoder.

The reference model and the perceptual encoder are the policy U-Net with its
adapters disabled: no second copy of the weights is ever made.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import socket
from urllib.parse import urlparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch
from torch import Tensor, nn

from ncp.families import Conditioning, denoiser_family, denoiser_folders, detect_kind, family  # noqa: F401 (re-exported: ncp.models is where callers look)
from ncp.families.unet import TAP_PRESETS, Tap, encoder_features  # noqa: F401 (re-exported)
from ncp.paths import bundle_path

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model folder or hub id cannot be loaded; the message names it."""


def resolve_model_path(path: str) -> str:
    if path == "bundle":
        folder = bundle_path("model")
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"the bundled model is missing at {folder}; rebuild it with `python -m ncp.world build`")
        return str(folder)
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir() or not any((local / d).is_dir() for d in denoiser_folders()):
            raise ModelLoadError(f"model.path {local} is not a diffusers pipeline folder (no "
                                 f"{' or '.join(d + '/' for d in denoiser_folders())} subfolder)")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelLoadError(f"model.path {path} does not exist (and is not a hub id of the form org/name)")
    return hub_model(path)


def hub_model(repo_id: str) -> str:
    """A hub id as ``from_pretrained`` should get it: the id when the hub answers, else its local copy in the
    hub cache, else a :class:`ModelLoadError` at once (not 30 s of retries and a missing-file error)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = constants.is_offline_mode()
    if not offline and hub_reachable(constants.ENDPOINT):
        return repo_id
    why = "HF_HUB_OFFLINE is set" if offline else f"{constants.ENDPOINT} does not answer"
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError as err:
        raise ModelLoadError(f"no network and no local copy of {repo_id} ({why}; none in the hub cache "
                             f"{constants.HF_HUB_CACHE}): download it where there is a network "
                             f"(hf download {repo_id}) or set model.path to a local folder") from err


@functools.cache
def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds (asked once per process)."""
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


@dataclass
class Models:
    kind: str  # the model family (ncp.families): "sd15", "sdxl", "sd3", "flux"
    unet: nn.Module  # the denoiser (U-Net or transformer) with LoRA adapters: the policy
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list
    scheduler: object  # the family's diffusers scheduler (DDPM, flow matching)
    weight_dtype: torch.dtype
    device: torch.device


@contextlib.contextmanager
def quiet_loading():
    """transformers' "Loading weights" and diffusers' "Loading pipeline components" bars off for one load, by
    the libraries' own switches (restored after): every ncp command loads models, none should print them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def _from_pretrained(cls, path: str, subfolder: str, **kwargs):
    try:
        with quiet_loading():
            return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelLoadError(f"cannot load {subfolder}/ of model {path}: {err}") from err


def load_models(
    path: str, kind: str, device: torch.device, weight_dtype: torch.dtype, vae_path: str | None = None,
    encoders_on_device: bool = True, with_unet: bool = True,
) -> Models:
    """Load a diffusers-format pipeline: frozen VAE and text encoder(s), the denoiser (``Models.unet``: the
    family's U-Net or transformer) and its scheduler.

    With ``encoders_on_device=False`` (training from the latent cache) the VAE and
    text encoders stay on the CPU, leaving the accelerator's memory to the U-Net.
    With ``with_unet=False`` (writing the latent cache) there is no U-Net and no
    scheduler, and ``path`` is taken as it is (a folder of the VAE and text encoder(s) will do).
    """
    import diffusers
    import transformers
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer

    path = resolve_model_path(path) if with_unet else path
    kind = detect_kind(path) if kind == "auto" else kind
    fam = family(kind)
    scheduler = _from_pretrained(getattr(diffusers, fam.scheduler_class), path, "scheduler") if with_unet else None
    # diffusers models get their dtype at load: ModelMixin.to(dtype=...) warns on every cast (diffusers 0.42)
    unet = (_from_pretrained(getattr(diffusers, fam.denoiser_class), path, fam.denoiser, torch_dtype=weight_dtype)
            if with_unet else None)
    vae = _from_pretrained(AutoencoderKL, vae_path or path, None if vae_path else "vae",
                           torch_dtype=weight_dtype if encoders_on_device else torch.float32)
    tokenizers = [_from_pretrained(AutoTokenizer, path, tok) for tok, _, _ in fam.text_encoders]
    text_encoders = [_from_pretrained(getattr(transformers, cls), path, enc) for _, enc, cls in fam.text_encoders]
    for module in [m for m in (unet, vae, *text_encoders) if m is not None]:
        module.requires_grad_(False)
        module.eval()
        on_device = module is unet or encoders_on_device
        dtype = {} if module is unet or module is vae else {"dtype": weight_dtype if on_device else torch.float32}
        module.to(device=device if on_device else torch.device("cpu"), **dtype)
    if vae_path is None and fam.vae_overflows_in_fp16 and weight_dtype == torch.float16:
        logger.warning("%s's VAE overflows in fp16; set model.vae_path to an fp16-safe VAE", kind)
    return Models(kind, unet, vae, text_encoders, tokenizers, scheduler, weight_dtype, device)


def add_lora(unet: nn.Module, rank: int, alpha: float, target_modules: list[str], dropout: float,
             init_from: str | None = None) -> list[nn.Parameter]:
    """Add a peft LoRA adapter to the U-Net; return its trainable parameters (kept in fp32)."""
    from peft import LoraConfig

    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules,
                                    lora_dropout=dropout, init_lora_weights=True))
    except ValueError as err:  # peft: no module matched (NoMatchingPeftModuleError is a ValueError)
        linear = sorted({_short_name(n) for n, m in unet.named_modules() if isinstance(m, nn.Linear)})
        raise ModelLoadError(f"lora.target_modules {target_modules} matched no module of the U-Net (its linear "
                             f"layers end in {', '.join(linear[:12])}{', ...' if len(linear) > 12 else ''})") from err
    if init_from is not None:
        load_lora_into(unet, init_from)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ModelLoadError(f"lora.target_modules {target_modules} matched no module of the U-Net")
    for p in params:
        p.data = p.data.float()
    return params


def _short_name(path: str) -> str:
    """The end of a module path that names it: ``to_q``, ``to_out.0`` (a list index needs its list's name)."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def lora_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The adapter weights as the denoiser's pipeline LoRA loader writes them (U-Net: ``…lora.down/up.weight``)."""
    return denoiser_family(unet).lora_state_dict(unet)


def save_lora(unet: nn.Module, out_dir: str | Path, kind: str) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable by the pipeline's ``load_lora_weights``."""
    # the pipelines' own LoRA writers, without importing a pipeline module (and the image processors it imports)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet).items()}
    family(kind).save_lora(out_dir, state, unet.peft_config["default"].to_dict())
    return Path(out_dir) / "pytorch_lora_weights.safetensors"


def load_lora_into(unet: nn.Module, lora_dir: str | Path) -> None:
    """Load a diffusers-format LoRA (as written by :func:`save_lora`) into the existing adapter."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(lora_dir) / "pytorch_lora_weights.safetensors"
    if not file.is_file():
        raise ModelLoadError(f"no LoRA weights at {file}")
    try:
        state = load_file(str(file))
    except Exception as err:  # safetensors raises its own error type on a damaged file
        raise ModelLoadError(f"{file} is unreadable ({err})") from err
    fam = denoiser_family(unet)
    state = {k.removeprefix(f"{fam.denoiser}."): v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, fam.peft_state_dict(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelLoadError(f"LoRA {file} does not fit this {fam.denoiser}: unexpected keys {unexpected[:3]}...")


@contextlib.contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[None]:
    """Run the base weights (the reference / perceptual encoder); adapters come back on exit."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@contextlib.contextmanager
def _layers_disabled(layers: list[nn.Module]) -> Iterator[None]:
    """These LoRA layers off inside, each back to its own state on exit (so it nests)."""
    was_off = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, off in zip(layers, was_off):
            m.enable_adapters(not off)


def _adapters_off_checkpoint(module: nn.Module, *args):
    """A diffusers ``_gradient_checkpointing_func`` for the frozen encoder: the module runs with its
    adapters off in forward and again when backward recomputes it (by then they are back on)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]

    def run(*inputs):
        with _layers_disabled(layers):
            return module(*inputs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


@contextlib.contextmanager
def frozen_checkpointing(unet: nn.Module) -> Iterator[None]:
    """Inside, the U-Net's gradient checkpoints (diffusers' per-resnet and per-transformer-block ones)
    recompute with the adapters off: the frozen encoder's pass keeps the policy's checkpoint
    granularity, instead of one checkpoint whose recomputation holds the whole encoder at once."""
    flagged = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    saved = [m._gradient_checkpointing_func for m in flagged]
    for m in flagged:
        m._gradient_checkpointing_func = _adapters_off_checkpoint
    try:
        yield
    finally:
        for m, func in zip(flagged, saved):
            m._gradient_checkpointing_func = func


# ---------------------------------------------------------------- text conditioning


@torch.no_grad()
def encode_prompts(models: Models, captions: list[str]) -> Conditioning:
    """The condition of each caption, as the model's family encodes it (``ncp.families``: SD1.5 the last
    hidden layer; SDXL both encoders' penultimate layers, concatenated, and the pooled embedding)."""
    return family(models.kind).encode(models.tokenizers, models.text_encoders, captions, models.device,
                                      models.weight_dtype)


# ---------------------------------------------------------------- perceptual encoder


def resolve_taps(spec: list[str], kind: str, units: int) -> list[Tap]:
    """``objective.taps`` for a model of family ``kind`` with ``units`` tappable blocks (``Family.tap_units``:
    U-Net down blocks, transformer blocks), in forward order (``Family.resolve_taps``)."""
    return family(kind).resolve_taps(spec, units)


def concatenation_weights(shapes: list[tuple[int, int, int]], normalize: bool) -> list[float]:
    """Scale weights ``w_s`` for which ``sum_s w_s mean_s (F_s - G_s)^2`` is the NCP authors' error: one MSE
    over every tap's map viewed as ``(-1, h_min, w_min)`` and concatenated (``concat_intermediate_steps`` in
    their ``src/train/model_utils.py``), so each scale weighs by its element count ``N_s / N``. With
    ``normalize`` (their ``--normalize_intermediate_steps``) each viewed map is first multiplied by
    ``k_s = C_last / C_s'``, ``C_s' = N_s / (h_min w_min)`` its channels after the view and ``C_last`` those of
    the last tap, which multiplies its squared error by ``k_s^2``."""
    _, h_min, w_min = shapes[-1]
    counts = [c * h * w for c, h, w in shapes]
    if any(n % (h_min * w_min) for n in counts):
        raise ValueError(f"taps of shapes {shapes} cannot be viewed at the last tap's {h_min}x{w_min}")
    total = sum(counts)
    c_last = shapes[-1][0]
    scale = [(c_last * h_min * w_min / n) ** 2 if normalize else 1.0 for n in counts]
    return [n * k / total for n, k in zip(counts, scale)]


@dataclass(frozen=True)
class ConcatenatedTaps:
    """The scale weights of ``objective.taps=authors``: ``concatenation_weights`` of the feature maps a step
    actually taps (so any latent size, square or not, gets its exact element counts)."""

    normalize: bool

    def __call__(self, features: list[Tensor]) -> list[float]:
        return concatenation_weights([tuple(f.shape[1:]) for f in features], self.normalize)


TapWeights = Union[list[float], ConcatenatedTaps]


# ---------------------------------------------------------------- speed levers (model.compile_unet, attention_backend)

# The regions of ``compile_unet="regional"`` (``Family.compile_regions``): the blocks diffusers checkpoints one
# by one, so a compiled region is exactly what gradient checkpointing recomputes (and what
# ``frozen_checkpointing`` recomputes with the adapters off). Everything between them (U-Net: conv_in,
# embeddings, down/upsamplers, conv_out) stays eager.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Graphs per compiled code object: one per (block shape, grad mode, input requires_grad, adapters on/off)
# seen in a step. SD1.5 / SDXL reach a few dozen, all in the first step; torch's default limit (8) would
# silently fall back to eager for the rest.
RECOMPILE_LIMIT = 128


def compile_unet(unet: nn.Module, how: str | bool, mode: str = "default", backend: str = "inductor") -> nn.Module:
    """torch.compile the U-Net as ``model.compile_unet`` says; returns the module the policy runs.

    - ``"regional"``: each block of the family's ``compile_regions`` (U-Net: ResnetBlock2D and
      BasicTransformerBlock; transformers: their joint blocks) is compiled in place with static
      shapes. The policy, the reference (adapters off, no grad) and the perceptual encoder passes all run
      compiled code: dynamo compiles one graph per variant it meets in the first step (adapters on/off,
      grad on/off, batch 2B or KxB, block shape) and reuses them afterwards, so toggling adapters never
      recompiles after the first step (``compile_counters`` tells).
    - ``"full"``: ``torch.compile`` of the whole policy forward (the returned wrapper); the reference and
      encoder passes run on the unwrapped module, eager.
    - False: eager.
    ``mode`` is torch.compile's (``"reduce-overhead"``: CUDA graphs; then call
    ``torch.compiler.cudagraph_mark_step_begin()`` before each step).
    """
    if how is False or how == "off":
        return unet
    kwargs = dict(backend=backend, mode=None if mode == "default" or backend != "inductor" else mode)
    if how == "full":
        return torch.compile(unet, **kwargs)
    if how != "regional":
        raise ValueError(f"model.compile_unet must be false, 'regional' or 'full'; got {how!r}")
    from torch import _dynamo  # (``import torch._dynamo`` here would make ``torch`` local to the function)

    _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    _dynamo.config.accumulated_recompile_limit = max(_dynamo.config.accumulated_recompile_limit,
                                                     8 * RECOMPILE_LIMIT)
    names = denoiser_family(unet).compile_regions
    regions = [m for m in unet.modules() if type(m).__name__ in names]
    for module in regions:
        module.compile(dynamic=False, **kwargs)
    logger.info("compile_unet=regional: %d blocks compiled (%s)", len(regions), ", ".join(names))
    return unet


def compile_counters() -> dict[str, int]:
    """torch._dynamo's counts so far: graphs compiled, and frames it gave up on (eager fallbacks).
    Constant from one step to the next = no recompilation."""
    from torch._dynamo.utils import counters

    return {"compile/graphs": int(counters["stats"]["unique_graphs"]),
            "compile/frames_failed": int(counters["frames"]["total"] - counters["frames"]["ok"])}


ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """The scaled-dot-product-attention kernels the U-Net may use inside (``model.attention_backend``):
    ``auto`` leaves PyTorch's choice; the others allow only that kernel (an error where it cannot run)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if name not in kernels:
        raise ValueError(f"model.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    return sdpa_kernel([kernels[name]])
