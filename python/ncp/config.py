"""Typed configuration: one dataclass per concern, a YAML file, dotted ``key=value`` overrides.

Every field carries its help text (``python -m ncp.train --help`` prints them all).
An unknown key or a value of the wrong type is an error that names the key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ncp.objectives import OBJECTIVES


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text (mutable defaults are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


OBJECTIVE_NAMES = tuple(OBJECTIVES)  # one table: ncp.objectives.OBJECTIVES
ObjectiveName = Literal[OBJECTIVE_NAMES]  # type: ignore[valid-type]


@dataclass
class ModelConfig:
    path: str = opt("bundle", "diffusers pipeline folder or hub id; 'bundle' is the small model shipped with ncp")
    kind: Literal["auto", "sd15", "sdxl", "sd3", "flux"] = opt("auto", "model family; 'auto' reads model_index.json")
    weight_dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "dtype of the frozen weights (auto: bf16 on GPU, fp32 on CPU; fp32 for the ncp-* objectives when "
                "perceptual_precision is auto, tf32 or fp32)")
    perceptual_precision: Literal["auto", "same", "fp16", "tf32", "fp32"] = opt(
        "auto", "precision of the ncp-* objectives' reverse step and encoder passes: 'same' as the policy; "
                "'fp16' the reverse step in fp32, the encoder under fp16 autocast; 'fp32' both in fp32 with TF32 "
                "off on a GPU (needs fp32 weights); 'tf32' the same with TF32 on; auto: fp32 under a bf16 policy "
                "(fp16 over half-precision weights), else same. bf16 rounds NCP's branch difference away "
                "(docs/method.md, Precision)")
    sigma_sampling: Literal["logit_normal", "mode", "uniform"] = opt(
        "logit_normal", "flow-matching families (sd3, flux): the density of the training sigmas (SD3's logit-normal, "
                        "its mode sampling, or uniform); the U-Net families draw DDPM timesteps uniformly")
    vae_path: str | None = opt(None, "a separate VAE folder (e.g. an fp16-safe SDXL VAE)")
    gradient_checkpointing: bool = opt(False, "recompute U-Net activations in backward to save memory")
    compile_unet: Literal[False, "regional", "full"] = opt(
        False, "torch.compile the U-Net: 'regional' compiles each resnet and transformer block, so the policy, "
               "reference and encoder passes (adapters on and off) all run compiled code without recompiling "
               "after the first step; 'full' compiles the policy's whole forward only; false: eager")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = opt(
        "default", "torch.compile mode of compile_unet; 'reduce-overhead' adds CUDA graphs")
    channels_last: bool = opt(False, "channels-last memory format for the U-Net and VAE")
    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = opt(
        "auto", "scaled-dot-product attention kernel of the U-Net (auto: PyTorch's choice)")


@dataclass
class LoraConfig:
    rank: int = opt(64, "LoRA rank (paper: 64)")
    alpha: float = opt(64.0, "LoRA alpha; the update is scaled by alpha / rank")
    target_modules: list[str] = opt(["to_q", "to_k", "to_v", "to_out.0"], "U-Net modules that get adapters")
    dropout: float = opt(0.0, "LoRA dropout")
    init_from: str | None = opt(None, "start from this diffusers-format LoRA folder instead of a fresh adapter")


@dataclass
class DataConfig:
    backend: Literal["torch", "rust"] = opt(
        "rust", "loader: 'rust' (ncp_dataloader, fast) or 'torch' (PyTorch Dataset + PIL, the baseline)")
    sources: list[str] = opt(["bundle"], "parquet paths or globs, or one JSONL file; 'bundle' is the shipped data")
    format: Literal["pairs", "unpaired"] = opt(
        "pairs", "what a row holds: 'pairs' (caption, two images, two labels: winner and loser) or 'unpaired' "
                 "(caption, one image, a desirable/undesirable label: binary feedback, for kto / ncp-kto)")
    resolution: int = opt(512, "square training resolution in pixels (shorter side resized, then cropped)")
    batch_size: int = opt(8, "pairs (unpaired: images) per device per micro-step")
    random_crop: bool = opt(False, "random instead of center crop (one box per pair)")
    random_flip: bool = opt(True, "horizontal flip with p=0.5 (one decision per pair); off when captions say left/right, as in the bundled world")
    absolute_winners: bool = opt(False, "keep only 'absolute winners' pairs (NCP paper filter)")
    drop_ties: bool = opt(True, "drop tied pairs (label_0 == label_1)")
    empty_prompt_prob: float = opt(0.2, "probability of training a pair on the empty prompt (Diffusion-DPO: 0.2)")
    columns: dict[str, str] = opt({}, "column renames, logical -> actual: caption, jpg_0, jpg_1, label_0, label_1, "
                                      "image_0_uid, image_1_uid (pairs); caption, image, label (unpaired: "
                                      "parquet columns or JSONL keys)")
    num_workers: int = opt(2, "decoding workers (torch) or threads (rust; 0 = all cores)")
    cache_dir: str | None = opt(None, "latent cache folder written by `python -m ncp.cache` (skips decoding and VAE)")
    strict: bool = opt(False, "a corrupt image is an error instead of a counted, reported skip")


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = opt(
        "ncp-dpo", "objective (docs/objectives.md); 'ncp-*' compares in the U-Net encoder's perceptual space")
    beta: float = opt(5000.0, "DPO beta in -logsigmoid(-beta/2 (d_theta - d_ref)) (Diffusion-DPO: 5000)")
    beta_cpo: float = opt(5000.0, "CPO beta in -logsigmoid(-beta_cpo/2 d_theta)")
    cpo_lambda: float = opt(1.0, "weight of the CPO likelihood term ERR_theta(winner)")
    beta_mapo: float = opt(0.1, "MaPO weight of the margin term -logsigmoid(T (g(ERR_w) - g(ERR_l))) (MaPO: 0.1)")
    mapo_snr: float = opt(0.5, "MaPO's s in g(x) = s x / (exp(s x) - 1) (MaPO's snr_value: 0.5)")
    mapo_lambda: float = opt(1.0, "weight of the MaPO likelihood term ERR_theta(winner) (MaPO: 1)")
    beta_kto: float = opt(1000.0, "KTO beta in sigmoid(beta (r - z)) (Diffusion-KTO: 1000)")
    kto_lambda_d: float = opt(1.0, "KTO weight of desirable images (winners) (Diffusion-KTO: 1)")
    kto_lambda_u: float = opt(1.0, "KTO weight of undesirable images (losers) (Diffusion-KTO: 1)")
    taps: list[str] = opt(["auto"], "encoder taps: a preset (auto, paper, mid, multiscale, authors) or a list of "
                                    "'conv_in', down block indices and/or 'mid'; auto = mid for SD1.5, paper for "
                                    "SDXL; authors = the NCP authors' SD1.5 features (conv_in, every down block "
                                    "and mid, one MSE over their concatenation; paper for SDXL)")
    tap_weights: list[float] | None = opt(None, "one weight per tap (default 1 / number of taps; taps=authors "
                                                "weighs each by its element count)")
    tap_normalize: bool | None = opt(None, "taps=authors only: multiply each map by C_last / C_this before the "
                                           "concatenation (their --normalize_intermediate_steps; default true, "
                                           "as their 1500-step script)")
    error_scale: Literal["paper", "coef", "log", "log_t"] = opt(
        "paper", "how per-image errors enter the loss: 'paper' as the papers write them (Diffusion-DPO, NCP); "
                 "'coef' divides each perceptual error by c_e(t)^2, the reverse step's factor on the noise "
                 "(the encoder's metric in noise units, stateless); "
                 "'log' compares log errors, so a logit is a ratio of errors and one beta fits every timestep; "
                 "'log_t' weights the log errors by the reference's median error at each timestep, measured "
                 "before step 1 (ncp's own additions, docs/error_scale.md)")


@dataclass
class OptimConfig:
    lr: float = opt(1e-5, "peak learning rate")
    warmup_steps: int = opt(500, "linear warmup steps of the constant-with-warmup schedule")
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)")
    use_8bit: Literal["auto", "on", "off"] = opt("auto", "bitsandbytes 8-bit AdamW (auto: on CUDA only)")


@dataclass
class TrainConfig:
    max_steps: int = opt(2000, "optimizer steps")
    grad_accum: int = opt(1, "micro-steps per optimizer step")
    seed: int = opt(0, "seed of data order, noise, timesteps and LoRA init")
    output_dir: str = opt("outputs/ncp", "run folder: checkpoints, final LoRA, metrics")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto", "autocast dtype (auto: bf16 on GPU, no on CPU)")
    checkpoint_every: int = opt(500, "write a checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = opt(3, "keep the last K checkpoints")
    resume: str | None = opt(None, "'latest', 'auto' (latest if one exists, else start afresh: for restarted "
                                   "jobs) or a checkpoint folder to resume from")
    init_from: str | None = opt(None, "start a new run from another run's checkpoint folder: its LoRA and "
                                      "optimizer moments, not its step, data position or schedule (the rounds "
                                      "of ncp.onpolicy); an exported lora/ folder gives the weights alone")
    max_nonfinite: int = opt(10, "stop after this many non-finite losses in a row (each is skipped)")
    report: bool = opt(False, "after training on the bundled world: image grid, curves and judge rewards")
    device: Literal["auto", "cpu", "cuda"] = opt(
        "auto", "where to train (auto: cuda when available); cuda without a CUDA device is an error. Each process "
                "takes the GPU of its local rank: pick GPUs with CUDA_VISIBLE_DEVICES")
    cpu_threads: int = opt(0, "torch intra-op threads while training (0: torch's default; the report after "
                            "training uses torch's default); tiny models on a busy CPU run faster on 1. Runs side by side: "
                            "at most cores / runs each (two runs at 2 threads on 2 cores: 4.6 s/step against "
                            "0.35 alone, OpenMP oversubscribed)")


@dataclass
class LoggingConfig:
    progress: bool = opt(True, "show a progress bar")
    tensorboard: bool = opt(True, "also log to TensorBoard when it is installed")
    log_every: int = opt(1, "write metrics every N optimizer steps")
    validation_prompts: str | None = opt(None, "a prompt file (one a line) for validation images while training")
    validation_every: int = opt(0, "draw the validation grid (base vs LoRA) every N optimizer steps and at the end; "
                                   "0: never. PNG under <output_dir>/validation/ and in TensorBoard")
    validation_seeds: int = opt(2, "validation images per prompt (fixed seeds: the same noise at every step)")
    validation_steps: int = opt(0, "sampling steps of the validation images (0: the model's, see world.json; else 20)")
    validation_guidance: float | None = opt(None, "classifier-free guidance of the validation images "
                                                  "(default: the model's, see world.json; else 3.0)")
    peak_tflops: float | None = opt(None, "peak dense TFLOP/s of one device for perf/mfu (default: ncp.flops' "
                                          "table by GPU name and precision; no perf/mfu when unknown)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            ("data.resolution", self.data.resolution > 0 and self.data.resolution % 8 == 0, "a positive multiple of 8"),
            ("data.batch_size", self.data.batch_size > 0, "positive"),
            ("data.num_workers", self.data.num_workers >= 0, "0 or positive"),
            ("data.empty_prompt_prob", 0.0 <= self.data.empty_prompt_prob <= 1.0, "in [0, 1]"),
            ("lora.rank", self.lora.rank > 0, "positive"),
            ("optim.lr", self.optim.lr > 0, "positive"),
            ("optim.betas", len(self.optim.betas) == 2, "two numbers"),
            ("train.max_steps", self.train.max_steps > 0, "positive"),
            ("train.grad_accum", self.train.grad_accum > 0, "positive"),
            ("train.checkpoint_every", self.train.checkpoint_every >= 0, "0 (only at the end) or positive"),
            ("train.keep_checkpoints", self.train.keep_checkpoints > 0, "positive"),
            ("train.max_nonfinite", self.train.max_nonfinite > 0, "positive"),
            ("logging.validation_every", self.logging.validation_every >= 0, "0 or positive"),
            ("logging.validation_seeds", self.logging.validation_seeds > 0, "positive"),
            ("logging.validation_prompts", not self.logging.validation_every or self.logging.validation_prompts,
             "set (a prompt file) when logging.validation_every > 0"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ConfigError(f"{key} must be {what}")
        if self.data.format == "unpaired":
            objective = OBJECTIVES[self.objective.name]
            if not objective.per_image:
                per_image = ", ".join(n for n, o in OBJECTIVES.items() if o.per_image)
                raise ConfigError(f"data.format=unpaired gives single images with binary labels, but "
                                  f"objective.name={self.objective.name} compares the two images of a pair; "
                                  f"unpaired data trains {per_image}")
            if self.data.absolute_winners:
                raise ConfigError("data.absolute_winners selects pairs; data.format=unpaired has none")
        weights = self.objective.tap_weights
        authors = self.objective.taps == ["authors"]
        if weights is not None and authors:
            raise ConfigError("objective.tap_weights: taps=authors weighs each tap by its element count "
                              "(one MSE over the concatenation); give explicit taps to set weights")
        if weights is not None and len(weights) != len(self.objective.taps):
            raise ConfigError(f"objective.tap_weights has {len(weights)} values for {len(self.objective.taps)} taps")
        if self.objective.tap_normalize is not None and not authors:
            raise ConfigError(f"objective.tap_normalize applies to objective.taps=[authors] only; "
                              f"taps are {self.objective.taps}")
        if self.objective.error_scale == "coef" and OBJECTIVES[self.objective.name].space != "perceptual":
            raise ConfigError(f"objective.error_scale=coef scales perceptual errors by the reverse step's "
                              f"coefficient; objective.name={self.objective.name} compares latent errors "
                              f"(use ncp-{self.objective.name})")


# ---------------------------------------------------------------- resuming


# The fields a resumed run may set differently from its checkpoint: how long, how often, where and how fast it
# runs, and what it logs. Every other field shapes the saved state (the objective and its hyperparameters, the
# model, the LoRA, the data, its order and filters, the optimizer) and must match (``resume_differences``).
# "section.*" is a whole section. docs/runs.md lists them.
RESUME_MAY_CHANGE = (
    "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.resume", "train.output_dir",
    "train.max_nonfinite", "train.report", "train.device", "train.cpu_threads", "train.mixed_precision",
    "data.num_workers", "data.strict",
    "model.weight_dtype", "model.gradient_checkpointing", "model.compile_unet", "model.compile_mode",
    "model.channels_last", "model.attention_backend",
    "logging.*",
)


def may_change_on_resume(key: str) -> bool:
    return key in RESUME_MAY_CHANGE or f"{key.split('.')[0]}.*" in RESUME_MAY_CHANGE


def resume_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``key: checkpoint value -> current value`` for each field outside :data:`RESUME_MAY_CHANGE` that differs
    between a checkpoint's config (``saved``, as ``to_dict`` wrote it) and ``cfg``. Keys the checkpoint lacks
    (written before they existed) are not compared."""
    current = to_dict(cfg)
    diffs = []
    for section, values in current.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            old = (saved.get(section) or {}).get(key, value)
            if not may_change_on_resume(name) and _plain(old) != _plain(value):
                diffs.append(f"{name}: {old!r} -> {value!r}")
    return diffs


def check_resume(saved: dict[str, Any], cfg: Config, folder: Path) -> None:
    """One :class:`ConfigError` listing every :func:`resume_differences` of the checkpoint in ``folder``."""
    diffs = resume_differences(saved, cfg)
    if diffs:
        raise ConfigError(f"cannot resume from {folder}: {len(diffs)} setting(s) that shape the saved state differ "
                          f"from the checkpoint's (checkpoint -> now): {'; '.join(diffs)}. Only the settings of "
                          f"ncp.config.RESUME_MAY_CHANGE may change on resume (docs/runs.md)")


def _plain(value: Any) -> Any:
    """Tuples as lists, as JSON reads them back."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- type checking


def _check(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), else raise naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and value not in args:  # YAML 1.1 reads an unquoted on/off/yes/no as a bool
            spelled = [a for a in (("on", "yes") if value else ("off", "no")) if a in args]
            value = spelled[0] if len(spelled) == 1 else value
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        return [_check(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping; got {value!r}")
        return {_check(f"{key} key", k, args[0]): _check(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an integer; got {value!r}")
    if tp in (str, float) and not isinstance(value, tp):
        raise ConfigError(f"{key} must be a {tp.__name__}; got {value!r}")
    return value


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def build_config(values: dict[str, dict[str, Any]]) -> Config:
    """Build a validated Config from ``{section: {key: value}}``; unknown keys are errors."""
    sections = _sections()
    built = {}
    for section, entries in values.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(sections)}")
        if entries is None:
            entries = {}
        if not isinstance(entries, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of keys to values")
        cls = sections[section]
        hints = typing.get_type_hints(cls)
        for key, value in entries.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {section}.{key}; known: {', '.join(hints)}")
            entries[key] = _check(f"{section}.{key}", value, hints[key])
        built[section] = cls(**entries)
    return Config(**built)


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def apply_overrides(values: dict[str, dict[str, Any]], overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``lr=1e-5``, ``taps=[0,mid]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        if key.count(".") != 1:
            raise ConfigError(f"override key {key!r} must be section.key (e.g. optim.lr)")
        section, name = key.split(".")
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_str_field(section, name):
            value = raw  # a numeric-looking string (a path, a column name)
        if isinstance(value, list) and name == "taps":
            value = [str(v) for v in value]
        values.setdefault(section, {})
        if values[section] is None:
            values[section] = {}
        values[section][name] = value
    return values


def _is_str_field(section: str, name: str) -> bool:
    cls = _sections().get(section)
    if cls is None:
        return False
    tp = typing.get_type_hints(cls).get(name)
    return tp is str or tp == (str | None)


PERCEPTUAL_KEYS = ("taps", "tap_weights", "tap_normalize")  # read by the ncp-* objectives only


def unread_objective_keys(name: str, keys: list[str]) -> dict[str, str]:
    """The ``objective.*`` keys among ``keys`` that objective ``name`` does not read, each with who does."""
    objective = OBJECTIVES[name]
    out = {}
    for key in keys:
        section, _, field_name = key.partition(".")
        if section != "objective":
            continue
        readers = [n for n, o in OBJECTIVES.items() if field_name in o.hyperparameters]
        if readers and field_name not in objective.hyperparameters:
            out[key] = ", ".join(readers)
        elif field_name in PERCEPTUAL_KEYS and objective.space != "perceptual":
            out[key] = "the ncp-* objectives (their encoder taps)"
    return out


def check_overrides_apply(cfg: Config, overrides: list[str]) -> None:
    """A command-line ``objective.*`` override that the chosen objective does not read is an error naming it
    and the objectives that do (as TRL's configs refuse a field of another trainer). Recipe files may set the
    values of every objective: each objective reads its own."""
    unread = unread_objective_keys(cfg.objective.name, [o.partition("=")[0].strip() for o in overrides])
    if unread:
        listed = "; ".join(f"{k} (read by {who})" for k, who in unread.items())
        raise ConfigError(f"objective.name={cfg.objective.name} does not read {listed}: drop it or pick the "
                          f"objective that does")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    values = load_yaml(path) if path else {}
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    return build_config(apply_overrides(values, list(overrides or [])))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


RECIPES = Path(__file__).resolve().parent / "configs"  # the shipped recipes (python -m ncp.train --config NAME)
RECIPE_NAMES = ("default", "sd15", "sdxl", "sd3", "flux")  # default: the bundled world's; sd15, sdxl: the paper's,
# per family; sd3, flux: SD3.5's and Flux.1's (flow matching)
DEFAULT_CONFIG = RECIPES / "default.yaml"


def load_recipes() -> dict[str, Config]:
    """Each shipped recipe's config, by name."""
    return {name: load_config(RECIPES / f"{name}.yaml") for name in RECIPE_NAMES}


def help_text(recipes: dict[str, Config] | None = None) -> str:
    """Every option with its type and help, grouped by section, and the value a run gets: each recipe's
    (``recipes``: name -> its config) where one differs from the code's, which a ``--config`` file that does
    not set the key gets."""
    lines = []
    for section, cls in _sections().items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = hints[f.name]
            tp = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            values = {name: getattr(getattr(cfg, section), f.name) for name, cfg in (recipes or {}).items()}
            if any(v != default for v in values.values()):
                shown = " | ".join(f"{v!r} ({name})" for name, v in values.items())
                head = f"  {section}.{f.name} = {shown}  [{tp}]; a --config file without it: {default!r}"
            else:
                head = f"  {section}.{f.name} = {default!r}  [{tp}]"
            lines.append(f"{head}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m ncp.config > docs/config.md
    print("# Configuration reference\n\nGenerated from `ncp/config.py` (`python -m ncp.config > docs/config.md`); "
          "every option can be set in the YAML file (`section: {key: value}`) or on the command line as "
          "`section.key=value`. Every run starts from a recipe (`python/ncp/configs/`): `default` (the "
          "bundled world's, for `model.path=bundle`), or the model family's `sd15` / `sdxl` for any other model "
          "(`--config NAME` or a file picks one); where the recipes set an option, each one's value is shown "
          "(`value (recipe)`), and a `--config` file that leaves it out gets the code's default. On the command "
          "line, an `objective.*` value the chosen objective does not read (`objective.name=kto "
          "objective.beta=5`) is an error naming the objectives that read it.\n\n```\n"
          + help_text(load_recipes()) + "\n```")
