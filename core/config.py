"""Typed configuration: YAML files and presets validated into pydantic models, with dotted overrides.

A bad config fails here, before any process group or model exists, with a :class:`ConfigError` whose
message is one line naming the field and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from haina.core import registry
from haina.core.attention import check_kernel_config
from haina.core.errors import ConfigError, HainaError
from haina.core.files import read_yaml
from haina.core.overrides import apply_override
from haina.core.validation import SectionError, allowed_keys_of, first_error, one_line_validation_error

__all__ = [
    "AlignConfig",
    "ConfigError",
    "HainaConfig",
    "ModelConfig",
    "PluginSettings",
    "alignment_config",
    "apply_override",
    "build_config",
    "dump_config",
    "load_config",
    "plugin_settings",
    "preset_names",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PluginSettings(_Section):
    """Base class of a plugin's own settings: typed fields with defaults and one-line descriptions.

    Registered with the plugin (``register(kind, name, settings=MySettings)``), validated with the rest
    of the config, listed by ``haina plugins``, written into the run's config.yaml and read back on resume.
    """


class _WithPluginSections(_Section):
    """A config section whose extra keys are the settings of plugins at home in it (by plugin name).

    ``model.rope: {...}`` holds the settings of the position plugin ``rope``; a selected plugin always has
    its section (defaults filled in); an unknown key fails listing what is allowed.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    section_name: ClassVar[str] = ""

    @classmethod
    def selected_plugins(cls, data: dict[str, Any]) -> list[str]:
        """Names of the plugins this section's raw data selects (their sections get defaults)."""
        return []

    @classmethod
    def allowed_keys(cls) -> list[str]:
        sections = [e.name for e in registry.entries() if e.settings is not None
                    and registry.SECTION_OF_KIND.get(e.kind, "") == cls.section_name]
        return sorted({*cls.model_fields, *sections})

    @model_validator(mode="before")
    @classmethod
    def _plugin_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = cls.migrate(dict(data))
        for name in cls.selected_plugins(data):
            owner = registry.settings_owner(cls.section_name, name) if isinstance(name, str) else None
            if owner is not None and name not in data:
                data[name] = {}
        for key, value in list(data.items()):
            if key in cls.model_fields:
                continue
            owner = registry.settings_owner(cls.section_name, str(key))
            if owner is None:
                raise SectionError((key,), f"unknown key; allowed: {', '.join(cls.allowed_keys())}")
            if isinstance(value, owner.settings):
                continue
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise SectionError((key,), f"settings of the {owner.kind} plugin {key!r} must be a mapping")
            try:
                data[key] = owner.settings.model_validate(value)
            except ValidationError as exc:
                loc, message = first_error(exc, allowed_keys_of(owner.settings), unknown="unknown setting")
                raise SectionError((key, *loc), message) from None
        return data

    @classmethod
    def migrate(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Rewrite keys of an older release's config (see :meth:`HainaConfig.migrate`)."""
        return data

    def settings_of(self, name: str) -> Any:
        """The settings of plugin ``name`` at home in this section (its defaults when the config has none;
        None when the plugin declares no settings)."""
        extra = self.__pydantic_extra__ or {}
        if name in extra:
            return extra[name]
        owner = registry.settings_owner(self.section_name, name)
        return None if owner is None else owner.settings()


def plugin_settings(cfg: HainaConfig, kind: str, name: str) -> Any:
    """The settings of ``kind`` plugin ``name`` in ``cfg`` (defaults if absent; None if it has none)."""
    home = registry.SECTION_OF_KIND.get(kind, "")
    section = cfg if not home else getattr(cfg, home)
    return section.settings_of(name)


def _check_plugin(kind: str, name: str) -> str:
    if name not in registry.names(kind):
        raise ValueError(f"unknown {kind} plugin {name!r}; registered: {', '.join(registry.names(kind))}")
    return name


def swiglu_ffn_size(hidden_size: int) -> int:
    """Baichuan 2's FFN width: ceil(8/3 * hidden / 128) * 128."""
    return math.ceil(8 * hidden_size / 3 / 128) * 128


class ModelConfig(_WithPluginSections):
    """Model shape and components; ``model.<plugin>:`` sections hold the components' own settings."""

    section_name: ClassVar[str] = "model"
    vocab_size: int = Field(125696, gt=0, description="Vocabulary size (rows of the embedding and the head).")
    hidden_size: int = Field(4096, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(32, gt=0, description="Number of transformer blocks.")
    num_heads: int = Field(32, gt=0, description="Attention heads (no grouped-query attention).")
    ffn_hidden_size: int | None = Field(
        None, gt=0, description="SwiGLU inner width; default ceil(8/3*hidden/128)*128."
    )
    max_seq_len: int = Field(4096, gt=0, description="Longest sequence the position encoding is built for.")
    norm_eps: float = Field(1e-6, gt=0, description="RMSNorm epsilon.")
    rope_base: float = Field(10000.0, gt=0, description="RoPE frequency base.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialisation of weight matrices.")
    position: str = Field("rope", description="position plugin: rope, alibi, or a registered third-party one.")
    attention: str = Field(
        "auto", description="attention kernel plugin: auto (fastest installed that fits), sdpa, flex, flash, xformers."
    )
    norm: str = Field("rmsnorm", description="norm plugin.")
    mlp: str = Field("swiglu", description="mlp plugin.")
    head: str = Field("normhead", description="output head plugin: normhead (Baichuan 2) or linear.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or swiglu_ffn_size(self.hidden_size)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size}"
            )
        return self

    @classmethod
    def selected_plugins(cls, data: dict[str, Any]) -> list[str]:
        defaults = {k: f.default for k, f in cls.model_fields.items()}
        return [data.get(kind, defaults[kind]) for kind in ("position", "attention", "norm", "mlp", "head")]

    @field_validator("position", "attention", "norm", "mlp", "head")
    @classmethod
    def _known_plugin(cls, name: str, info: Any) -> str:
        return _check_plugin(info.field_name, name)

    @field_validator("attention")
    @classmethod
    def _kernel_fits(cls, name: str, info: Any) -> str:
        """A kernel named explicitly must be installed and take the position encoding's bias."""
        if "position" in info.data:
            check_kernel_config(name, info.data["position"])
        return name


class LossConfig(_WithPluginSections):
    """Loss terms; ``loss.<term>:`` sections hold a term's own settings."""

    section_name: ClassVar[str] = "loss"
    terms: dict[str, float] = Field(
        default_factory=lambda: {"cross_entropy": 1.0, "max_z": 2e-4},
        description="loss plugins and their coefficients, summed; computed together in sequence chunks.",
    )
    chunk_size: int = Field(1024, gt=0, description="Tokens per chunk of the split vocabulary loss.")

    @classmethod
    def selected_plugins(cls, data: dict[str, Any]) -> list[str]:
        terms = data.get("terms")
        return list(terms) if isinstance(terms, dict) else ["cross_entropy", "max_z"]

    @field_validator("terms")
    @classmethod
    def _known_terms(cls, terms: dict[str, float]) -> dict[str, float]:
        if not terms:
            raise ValueError("at least one loss term is needed")
        for name in terms:
            _check_plugin("loss", name)
        return terms


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (7B: 2e-4, 13B: 1.5e-4).")
    min_lr: float = Field(2e-5, ge=0, description="Floor of the cosine decay (not published; 0.1 x peak).")
    warmup_steps: int = Field(2000, ge=0, description="Linear warmup steps.")
    decay_steps: int | None = Field(
        None, gt=0, description="Steps from the start to the end of the cosine; default train.steps."
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon (not published).")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay on matrices and embeddings.")
    clip_grad: float = Field(0.5, gt=0, description="Global gradient-norm clip.")

    @model_validator(mode="after")
    def _min_below_peak(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} must not exceed lr {self.lr}")
        return self


class DataConfig(_Section):
    prefixes: list[str] = Field(
        default_factory=list, description="Megatron indexed datasets (path prefixes of .bin/.idx)."
    )
    weights: list[float] | None = Field(None, description="Blend weights, one per prefix; default equal.")
    blend: str | None = Field(
        None, description="blend.json from `haina data prepare` (prefixes and weights); instead of prefixes."
    )
    tokenizer: str | None = Field(None, description="SentencePiece model file used to make the data.")

    @model_validator(mode="after")
    def _weights_match(self) -> DataConfig:
        if self.weights is not None and len(self.weights) != len(self.prefixes):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.prefixes)} prefixes")
        if self.blend is not None and self.prefixes:
            raise ValueError("give either blend or prefixes, not both")
        return self


class GuardConfig(_Section):
    enabled: bool = Field(True, description="Skip updates with a non-finite loss/grad norm or a loss spike.")
    window: int = Field(100, gt=1, description="Accepted losses the spike statistics are taken over.")
    warmup: int = Field(20, ge=2, description="Accepted losses needed before loss spikes are judged.")
    sigma: float = Field(6.0, gt=0, description="A spike: loss > mean + sigma x std of the window (+ min_margin).")
    min_margin: float = Field(0.1, ge=0, description="Absolute loss margin added to the spike threshold.")
    max_bad_steps: int = Field(
        3, ge=0, description="Consecutive bad steps that reload the last checkpoint and skip past their data "
        "(0 = never roll back).",
    )


class TrainConfig(_Section):
    steps: int = Field(1000, gt=0, description="Optimizer steps to train for.")
    micro_batch_size: int = Field(1, gt=0, description="Sequences per forward pass on one data-parallel rank.")
    global_batch_size: int | None = Field(
        None, gt=0,
        description="Sequences per optimizer step over all ranks; default micro_batch_size x data-parallel "
        "size. The rest is gradient accumulation (pipeline microbatches under pp).",
    )
    seq_len: int = Field(4096, gt=1, description="Tokens per training sequence.")
    seed: int = Field(1234, description="Seed of initialisation, data order and dropout.")
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", description="bf16: autocast compute with fp32 master weights; fp32: everything fp32."
    )
    log_every: int = Field(10, gt=0, description="Steps between metric records.")
    save_every: int = Field(1000, gt=0, description="Steps between checkpoints (and one at the end).")
    run_dir: str = Field("runs/default", description="Run directory: config, metrics, tensorboard, checkpoints.")
    resume: bool = Field(True, description="Resume from the run directory's latest checkpoint if there is one.")
    keep_checkpoints: int = Field(3, ge=0, description="Newest checkpoints to keep (0 = all).")
    async_save: bool = Field(True, description="Write checkpoints in the background (training goes on).")
    max_restarts: int = Field(0, ge=0, description="torchrun --max-restarts for --nproc-per-node launches.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Loss-spike and NaN guard.")
    progress: bool = Field(True, description="Show a progress bar.")


class ParallelConfig(_Section):
    tp: int = Field(1, gt=0, description="Tensor-parallel size (innermost mesh dimension, inside a node).")
    pp: int = Field(1, gt=0, description="Pipeline-parallel stages.")
    dp_replicate: int = Field(1, gt=0, description="Data-parallel replicas (HSDP's outer dimension).")
    dp_shard: int = Field(-1, description="FSDP2 shard group size; -1 = the rest of the world size.")
    sequence_parallel: bool = Field(True, description="Shard norms' activations by sequence under tp.")
    reshard_after_forward: bool = Field(
        True, description="FSDP2: free gathered parameters after forward (ZeRO-3); false = ZeRO-2-like."
    )
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "zero_bubble"] = Field(
        "1f1b", description="Pipeline schedule."
    )
    pp_virtual_stages: int = Field(1, gt=0, description="Model chunks per pipeline rank (interleaved).")
    pp_stage_layers: list[int] | None = Field(
        None, description="Blocks per pipeline stage, first to last (pp x pp_virtual_stages entries summing to "
        "model.num_layers); fewer on the end stages balances the embedding and head they hold. Default: even.",
    )
    activation_checkpoint: Literal["none", "full", "selective"] = Field(
        "none", description="Recompute activations: none, every block, or the attention core only."
    )
    fsdp_prefetch: int = Field(
        0, ge=0, description="FSDP2: blocks whose all-gather is issued ahead explicitly, in forward and backward "
        "(0 = FSDP2's own: one block ahead in backward); more overlap, more gathered blocks held.",
    )
    compile: bool = Field(False, description="torch.compile each block's forward (after tp and AC, before FSDP).")
    dp_backend: Literal["fsdp2", "deepspeed"] = Field(
        "fsdp2", description="Sharded data parallelism: FSDP2 (any layout) or DeepSpeed ZeRO (tp = pp = 1)."
    )
    collective_timeout_s: float = Field(
        1800.0, gt=0, description="How long a collective waits for a slow rank (rank 0's index build, a "
        "checkpoint publish) before the job fails; NCCL's own default is 600 s.",
    )

    @field_validator("dp_shard")
    @classmethod
    def _shard_size(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"must be -1 (the rest) or a positive size, got {value}")
        return value


# keys of a DeepSpeed config that haina derives from its own fields (one source of truth)
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size",
    "gradient_clipping": "optim.clip_grad",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "optim.*",
    "scheduler": "optim.* (the schedule is set by the training loop every step)",
}


class DeepSpeedConfig(_Section):
    """The ZeRO backend (``parallel.dp_backend=deepspeed``); batch, clipping, precision and the optimizer
    come from haina's own fields, ``config`` overrides DeepSpeed's advanced keys."""

    zero_stage: Literal[1, 2, 3] = Field(2, description="ZeRO stage: 1 optimizer states, 2 + gradients, 3 + parameters.")
    offload_optimizer: bool = Field(False, description="Optimizer states and step on the CPU (DeepSpeed's CPU Adam).")
    offload_params: bool = Field(False, description="Parameters on the CPU between uses (ZeRO-3 only).")
    reduce_bucket_size: int | None = Field(
        None, gt=0, description="Elements per gradient-reduction bucket (a buffer of this size, two with "
        "overlap_comm); default DeepSpeed's 5e8.",
    )
    allgather_bucket_size: int | None = Field(
        None, gt=0, description="Elements all-gathered at a time after the step (ZeRO-1/2); default DeepSpeed's 5e8.",
    )
    overlap_comm: bool | None = Field(
        None, description="Overlap gradient reduction with backward; default DeepSpeed's (on for ZeRO-3 only).",
    )
    stage3_max_live_parameters: int | None = Field(
        None, gt=0, description="ZeRO-3: elements kept gathered at most before DeepSpeed releases any (what "
        "a rank holds of whole parameters during forward and backward); default DeepSpeed's 1e9.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Advanced DeepSpeed keys merged over the derived config, e.g. {zero_optimization: {overlap_comm: true}}.",
    )

    # the zero_optimization keys with typed fields above, and DeepSpeed's defaults for them
    TUNED_KEYS: ClassVar[tuple[str, ...]] = ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm",
                                             "stage3_max_live_parameters")

    def zero_setting(self, key: str) -> Any:
        """The value DeepSpeed will use for ``zero_optimization.<key>`` (one of :attr:`TUNED_KEYS`): the
        typed field, else ``config``'s, else DeepSpeed's default."""
        value = getattr(self, key)
        zero = self.config.get("zero_optimization", {})
        if value is None and isinstance(zero, dict):
            value = zero.get(key)
        if value is None:
            value = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
                     "overlap_comm": self.zero_stage == 3, "stage3_max_live_parameters": 1_000_000_000}[key]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got {self.zero_stage})")
        for key in self.config:
            if key in DEEPSPEED_OWNED_KEYS:
                raise ValueError(f"config.{key} is set from haina's {DEEPSPEED_OWNED_KEYS[key]}; set that instead")
        zero = self.config.get("zero_optimization", {})
        for key in ("stage", "offload_optimizer", "offload_param"):
            if isinstance(zero, dict) and key in zero:
                raise ValueError(f"config.zero_optimization.{key}: use deepspeed.zero_stage / offload_* instead")
        for key in self.TUNED_KEYS:
            if getattr(self, key) is not None and isinstance(zero, dict) and key in zero:
                raise ValueError(f"config.zero_optimization.{key}: set either deepspeed.{key} or this, not both")
        return self


class TokenizerConfig(_Section):
    vocab_size: int = Field(125696, gt=0, description="Pieces in the SentencePiece BPE model.")
    character_coverage: float = Field(0.9999, gt=0, le=1, description="Share of characters covered.")
    max_piece_length: int = Field(32, gt=0, description="Longest piece in characters.")
    whitespace_pieces: list[int] = Field(
        default_factory=lambda: [2, 4, 8, 16],
        description="Run lengths of spaces added as pieces (code indentation), plus tab runs of 1..2.",
    )
    user_token: str = Field("<reserved_106>", description="Chat user-role token.")
    assistant_token: str = Field("<reserved_107>", description="Chat assistant-role token.")
    input_sentence_size: int = Field(2_000_000, gt=0, description="Sentences sampled for training.")
    seed: int = Field(1234, description="Seed of sentence sampling.")


class AlignConfig(_Section):
    """What every alignment algorithm starts from and reads; each algorithm's own settings are its plugin
    section (``sft:``, ``rm:``, ``ppo:``, ``dpo:``)."""

    init_from: str | None = Field(None, description="Checkpoint (run or step dir) the trained model starts from.")
    data: str | None = Field(None, description="JSONL: conversations (sft), pairs (rm, dpo), prompts (ppo).")
    eval_data: str | None = Field(None, description="Held-out JSONL scored after training (rm: pairs).")
    tokenizer: str | None = Field(None, description="SentencePiece model with the chat role tokens.")


def _is_default(settings: type, target: str, value: Any) -> bool:
    """Whether ``value`` equals the default of ``settings`` field ``target`` ("" = the whole model)."""
    default = settings().model_dump(mode="json")
    if not target:
        return isinstance(value, dict) and all(default.get(k) == v for k, v in value.items())
    return default.get(target) == value


class HainaConfig(_WithPluginSections):
    """A whole run. Top-level ``<algorithm>:`` sections hold the algorithms' own settings."""

    section_name: ClassVar[str] = ""
    algorithm: str = Field("pretrain", description="algorithm plugin that turns a batch into a loss.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model shape and components.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss terms.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and LR schedule.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Parallel layout.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer training.")
    align: AlignConfig = Field(default_factory=AlignConfig, description="Alignment algorithms.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="DeepSpeed ZeRO backend.")

    @classmethod
    def selected_plugins(cls, data: dict[str, Any]) -> list[str]:
        return [data.get("algorithm", "pretrain")]

    @classmethod
    def migrate(cls, data: dict[str, Any]) -> dict[str, Any]:
        """An older release's ``align`` keys move to the plugin sections that declare them as ``legacy``
        (the selected algorithm first); a key only another algorithm claims is kept there unless it holds
        that algorithm's default."""
        align = data.get("align")
        if not isinstance(align, dict):
            return data
        selected = data.get("algorithm", "pretrain")
        align = dict(align)
        for key in [k for k in align if k not in AlignConfig.model_fields]:
            claims = [(e, e.legacy[f"align.{key}"]) for e in registry.entries("algorithm")
                      if f"align.{key}" in e.legacy and e.settings is not None]
            if not claims:
                continue
            claims.sort(key=lambda c: c[0].name != selected)
            value = align.pop(key)
            for e, target in claims:
                if e.name != selected and _is_default(e.settings, target, value):
                    continue
                section = data.setdefault(e.name, {})
                if not isinstance(section, dict):
                    continue
                if target:
                    section.setdefault(target, value)
                elif isinstance(value, dict):
                    for k, v in value.items():
                        section.setdefault(k, v)
                if e.name == selected:
                    break
        data["align"] = align
        return data

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, name: str) -> str:
        return _check_plugin("algorithm", name)

    @model_validator(mode="after")
    def _seq_fits(self) -> HainaConfig:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len {self.train.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}")
        return self

    @model_validator(mode="after")
    def _deepspeed_layout(self) -> HainaConfig:
        """ZeRO shards over the whole world: no tensor, pipeline or replicated (HSDP) dimension beside it."""
        p = self.parallel
        if p.dp_backend != "deepspeed":
            return self
        for name in ("tp", "pp", "dp_replicate"):
            if getattr(p, name) > 1:
                raise ValueError(
                    f"parallel.dp_backend=deepspeed runs data parallelism only; parallel.{name} must be 1 "
                    f"(got {getattr(p, name)}); use dp_backend=fsdp2 for tp/pp layouts"
                )
        if p.compile:
            raise ValueError("parallel.compile is not supported with dp_backend=deepspeed; use dp_backend=fsdp2")
        return self


# ---------------------------------------------------------------------------------------------- loading

def preset_names() -> list[str]:
    folder = resources.files("haina.core") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    if Path(source).is_file():
        return read_yaml(source, error=ConfigError)
    if source in preset_names():
        text = (resources.files("haina.core") / "presets" / f"{source}.yaml").read_text(encoding="utf-8")
        return read_yaml(source, text=text, error=ConfigError)
    raise ConfigError(f"--config {source!r}: no such file or preset; presets: {', '.join(preset_names())}")


def build_config(data: dict[str, Any]) -> HainaConfig:
    try:
        return HainaConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(one_line_validation_error(exc, allowed_keys_of(HainaConfig))) from None
    except HainaError as exc:  # a plugin's own check, raised inside validation
        raise ConfigError(str(exc).splitlines()[0]) from None


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> HainaConfig:
    """Read a YAML file or preset, apply dotted overrides, validate."""
    return _load(_read_yaml(source) if source else {}, overrides)


def _load(data: dict[str, Any], overrides: Sequence[str]) -> HainaConfig:
    for override in overrides:
        apply_override(data, override)
    return build_config(data)


def dump_config(config: HainaConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def alignment_config(
    algorithm: str, source: str | None, config: str | None, overrides: list[str] | tuple[str, ...]
) -> HainaConfig:
    """The config of an alignment run: ``--from RUN`` reuses RUN's model, tokenizer and layout, starts from
    its latest checkpoint and writes to RUN-<algorithm> unless the overrides say otherwise."""
    base: list[str] = [f"algorithm={algorithm}"]
    if source is not None:
        run = Path(source)
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"--from {source}: not a run directory (no config.yaml)")
        base += [f"align.init_from={run}", f"train.run_dir={run.parent / f'{run.name}-{algorithm}'}"]
        if config is None:  # the run's model, data and layout; not its algorithm's settings
            data = _read_yaml(str(run / "config.yaml"))
            for key in [k for k in data if k != algorithm]:
                owner = registry.settings_owner("", str(key))
                if owner is not None and owner.kind == "algorithm":
                    del data[key]
            return _load(data, [*base, *overrides])
    return load_config(config, [*base, *overrides])
