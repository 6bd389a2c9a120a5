"""Typed configuration of the data-preparation job, loadable from YAML with dotted overrides.

Every threshold the Baichuan 2 report leaves unpublished lives here with a default and a description,
so a run is fully described by its resolved ``config.yaml`` and a bad value fails before Spark starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from haina.core.errors import ConfigError
from haina.core.files import read_yaml
from haina.core.overrides import apply_override
from haina.core.validation import SectionError, allowed_keys_of, one_line_validation_error


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    text_key: str = Field("text", description="JSON field / Parquet column holding the document text")
    id_key: str = Field("id", description="optional field with a document id (row id used when absent)")
    source_key: str = Field("source", description="optional field naming the document's source")
    url_key: str = Field("url", description="optional field with the document's URL")
    default_source: str = Field("unknown", description="source given to documents without one")
    min_chars: int = Field(1, ge=1, description="documents shorter than this (after strip) are quarantined")
    max_chars: int = Field(1_000_000, ge=1, description="documents longer than this are quarantined as huge")
    raw_preview_chars: int = Field(2000, ge=0, description="bytes of a bad record kept in the quarantine")
    max_quarantine_share: float | None = Field(
        None, ge=0, le=1, description="stop (exit 2) when more than this share of input records is quarantined; "
        "None: never stop"
    )


class ExactDedupConfig(_Section):
    enabled: bool = Field(True, description="drop documents whose normalized text was seen before")


class EnglishRules(_Section):
    """Gopher quality rules for Latin-script prose (Rae et al. 2021, appendix A)."""

    min_words: int = Field(50, ge=0, description="fewer words than this: too short")
    max_words: int = Field(100_000, ge=1, description="more words than this: too long")
    min_mean_word_len: float = Field(3.0, ge=0, description="mean word length below this: not prose")
    max_mean_word_len: float = Field(10.0, ge=0, description="mean word length above this: not prose")
    max_symbol_word_ratio: float = Field(0.1, ge=0, description="'#' and '...' per word above this")
    max_bullet_line_fraction: float = Field(0.9, ge=0, le=1, description="share of lines starting with a bullet")
    max_ellipsis_line_fraction: float = Field(0.3, ge=0, le=1, description="share of lines ending in '...'")
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1, description="share of words with a letter")
    min_stop_words: int = Field(2, ge=0, description="English stop words required (the, be, to, of, ...)")


class ChineseRules(_Section):
    """Character-based rules for CJK text, where whitespace does not separate words."""

    min_chars: int = Field(30, ge=0, description="fewer non-space characters than this: too short")
    min_cjk_fraction: float = Field(0.3, ge=0, le=1, description="share of CJK characters among letters")
    max_symbol_char_ratio: float = Field(0.3, ge=0, le=1, description="share of punctuation/symbol characters")


class CodeRules(_Section):
    """The Stack / Codex-style rules for source code."""

    max_line_chars: int = Field(1000, ge=1, description="a longer line means minified or generated code")
    max_mean_line_chars: float = Field(100.0, ge=1, description="mean line length above this: generated")
    min_alnum_fraction: float = Field(0.25, ge=0, le=1, description="share of alphanumeric characters")


class RepetitionRules(_Section):
    """Gopher repetition rules; n-grams are words for Latin text and characters for CJK text."""

    max_dup_line_fraction: float = Field(0.3, ge=0, le=1, description="share of lines that are repeats")
    max_dup_line_char_fraction: float = Field(0.2, ge=0, le=1, description="share of characters in repeated lines")
    max_top_ngram_fraction: dict[int, float] = Field(
        {2: 0.2, 3: 0.18, 4: 0.16}, description="n -> share of characters covered by the most frequent n-gram"
    )
    max_dup_ngram_fraction: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> share of characters covered by repeated n-grams",
    )
    cjk_chars_per_word: float = Field(
        2.0, gt=0, description="n-gram sizes are multiplied by this for CJK text (counted in characters)"
    )
    code_max_dup_line_fraction: float = Field(
        0.5, ge=0, le=1, description="share of repeated non-trivial lines allowed in code"
    )


class HeuristicsConfig(_Section):
    enabled: bool = Field(True, description="run the Gopher/C4 heuristic rules")
    source_kinds: dict[str, Literal["en", "zh", "code"]] = Field(
        {"code": "code"}, description="source name -> kind, overriding detection from the text"
    )
    en: EnglishRules = Field(default_factory=EnglishRules, description="rules for Latin-script prose")
    zh: ChineseRules = Field(default_factory=ChineseRules, description="rules for CJK prose")
    code: CodeRules = Field(default_factory=CodeRules, description="rules for source code")
    repetition: RepetitionRules = Field(default_factory=RepetitionRules, description="repetition rules")
    line_blocklist: list[str] = Field(
        [
            "all rights reserved", "privacy policy", "terms of service", "terms of use", "cookie policy",
            "subscribe to our newsletter", "enable javascript", "javascript is disabled",
            "版权所有", "保留所有权利", "隐私政策", "联系我们",
        ],
        description="C4 line rule: a prose line containing one of these (case-insensitive) is removed",
    )
    doc_blocklist: list[str] = Field(
        ["lorem ipsum"], description="C4 document rule: a document containing one of these is removed"
    )
    require_terminal_punctuation: bool = Field(
        False, description="C4 rule dropping prose lines not ending in . ! ? \" (off: breaks docs with code)"
    )


class ModelTrainConfig(_Section):
    seed_file: Path | None = Field(None, description="TSV of label<TAB>line; None: the packaged seed set")
    num_features: int = Field(1 << 16, ge=1024, description="hashed n-gram feature space size")
    reg_param: float = Field(0.001, ge=0, description="L2 regularisation of the logistic regression")
    max_iter: int = Field(60, ge=1, description="optimizer iterations")


class QualityModelConfig(ModelTrainConfig):
    """The quality classifier learns from some fourteen thousand lines, so it needs far less regularisation
    than the safety classifier's few hundred."""

    reg_param: float = Field(1e-5, ge=0, description="L2 regularisation of the logistic regression")


class QualityConfig(_Section):
    """Stage 3. The cut between kept and removed sentences is either fixed (``sentence_threshold``) or taken
    from this job's own sentences so that ``target_removal_share`` of their characters goes. A fixed
    threshold wins: setting it alone clears the share; setting both is a contradiction and an error."""

    enabled: bool = Field(True, description="score every sentence with the quality classifier")
    kinds: list[Literal["en", "zh", "code"]] = Field(["en", "zh"], description="document kinds to judge")
    min_sentence_chars: int = Field(12, ge=1, description="shorter sentences are not judged (kept)")
    sentence_threshold: float | None = Field(
        None, ge=0, le=1, description="fixed cut: sentences whose probability is below this are removed; when "
        "set it wins over target_removal_share (which must then be left unset); None: use the share"
    )
    target_removal_share: float | None = Field(
        0.03, ge=0, lt=1, description="when sentence_threshold is unset: the cut is the score quantile of this "
        "job's judged sentences below which this share of their characters lies (the Baichuan 2 report's "
        "sentence filter removed about 3% of tokens; characters, since the approximate tokens count every "
        "symbol of a ruler line as a token)"
    )
    report_removed: int = Field(
        20, ge=0, description="removed sentences listed with their scores in report.json: this many of the "
        "lowest-scoring and this many of those just below the cut"
    )
    min_doc_score: float = Field(0.2, ge=0, le=1, description="documents whose quality score is below this go")
    model: QualityModelConfig = Field(
        default_factory=QualityModelConfig,
        description="classifier training (seed_file None: lines of installed text, generated spam, boilerplate "
        "and garbage, and the packaged seed; see docs/data_quality.md)",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_cut(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("sentence_threshold") is None:
            if isinstance(data, dict) and "target_removal_share" in data and data["target_removal_share"] is None:
                raise SectionError(("target_removal_share",), "is null but sentence_threshold is not set: "
                                   "give one of them (the cut needs a threshold or a share)")
            return data
        if data.get("target_removal_share") is not None:
            raise SectionError(("sentence_threshold",), f"{data['sentence_threshold']} contradicts "
                               f"target_removal_share={data['target_removal_share']}: set one of them "
                               "(target_removal_share=null to use the fixed threshold)")
        return {**data, "target_removal_share": None}


class LineDedupConfig(_Section):
    enabled: bool = Field(True, description="remove repeated paragraphs and lines across the corpus")
    units: list[Literal["paragraph", "line"]] = Field(["paragraph", "line"], description="units, in order")
    min_chars: int = Field(40, ge=1, description="shorter units are never removed (braces, short headings)")


class NearDedupConfig(_Section):
    enabled: bool = Field(True, description="MinHash-LSH document near-dedup")
    num_perm: int = Field(256, ge=2, description="MinHash permutations (datasketch num_perm)")
    seed: int = Field(1, description="MinHash seed (datasketch seed)")
    scheme: Literal["affine32", "legacy"] = Field("affine32", description="datasketch permutation scheme")
    shingle_hash: Literal["fast", "sha1"] = Field(
        "fast", description="shingle hash: 'fast' (each distinct token hashed once, shingles combined in numpy "
        "over a whole batch) or 'sha1' (datasketch's sha1_hash32 per shingle: signatures identical to "
        "datasketch.MinHash, about twice as slow to sign)"
    )
    shingle_size: int = Field(5, ge=1, description="shingle = this many consecutive words (CJK: characters)")
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity that makes two documents duplicates")
    lsh_threshold: float = Field(
        0.7, gt=0, lt=1, description="threshold the banding is optimised for; below `threshold` buys recall"
    )
    false_positive_weight: float = Field(0.5, ge=0, le=1, description="datasketch banding optimisation weight")
    false_negative_weight: float = Field(0.5, ge=0, le=1, description="datasketch banding optimisation weight")
    verify: Literal["exact", "signature", "none"] = Field(
        "exact", description="check LSH candidates: exact Jaccard of shingle hashes, signature estimate, or not"
    )
    max_iterations: int = Field(40, ge=1, description="connected-components iteration cap")
    dup_weight_exponent: float = Field(
        0.25, ge=0, le=1, description="kept representative's weight factor = component size ** this"
    )
    report_clusters: int = Field(
        20, ge=0, description="clusters (representative and removed copies with their Jaccard) listed in report.json"
    )

    @model_validator(mode="after")
    def _weights(self) -> NearDedupConfig:
        if abs(self.false_positive_weight + self.false_negative_weight - 1.0) > 1e-6:
            raise ValueError("false_positive_weight + false_negative_weight must be 1")
        return self


class EmbeddingConfig(_Section):
    enabled: bool = Field(True, description="hashed n-gram embeddings clustered with k-means (fitted on the driver)")
    dim: int = Field(64, ge=2, description="dimension of the random projection")
    k: int = Field(16, ge=1, description="k-means clusters (capped by the number of documents)")
    max_iter: int = Field(20, ge=1, description="k-means iterations")
    seed: int = Field(7, description="projection and k-means seed")
    density_exponent: float = Field(
        0.5, ge=0, description="weight factor = (cluster size / mean cluster size) ** -this"
    )


class SafetyConfig(_Section):
    enabled: bool = Field(True, description="word-list and model safety filter")
    blocklist: list[str] = Field(
        [], description="case-insensitive phrases; a line containing one is unsafe regardless of the model"
    )
    threshold: float = Field(0.6, ge=0, le=1, description="a line whose unsafe probability >= this is unsafe")
    min_line_chars: int = Field(12, ge=1, description="shorter lines are not scored by the model")
    action: Literal["drop_document", "drop_lines"] = Field(
        "drop_document", description="what an unsafe line costs: its document, or only itself"
    )
    upsample_sources: dict[str, float] = Field(
        {}, description="source -> weight multiplier for curated positive-value sources"
    )
    model: ModelTrainConfig = Field(default_factory=ModelTrainConfig, description="classifier training")


class CategoryRule(_Section):
    name: str = Field(description="category name (also the shard folder)")
    sources: list[str] = Field([], description="documents from these sources match")
    kinds: list[Literal["en", "zh", "code"]] = Field([], description="documents of these kinds match")
    keywords: list[str] = Field([], description="documents containing one of these (case-insensitive) match")


class CategoryConfig(_Section):
    rules: list[CategoryRule] = Field(
        default_factory=lambda: [
            CategoryRule(name="code", kinds=["code"]),
            CategoryRule(name="zh", kinds=["zh"]),
            CategoryRule(name="en", kinds=["en"]),
        ],
        description="taxonomy: the first matching rule names the category",
    )
    default: str = Field("other", description="category of documents no rule matches")
    targets: dict[str, float] = Field(
        {}, description="category -> token share of the blend; unnamed categories share the rest naturally"
    )

    @model_validator(mode="after")
    def _targets(self) -> CategoryConfig:
        if any(v < 0 for v in self.targets.values()) or sum(self.targets.values()) > 1 + 1e-9:
            raise ValueError("targets must be non-negative shares summing to at most 1")
        return self


class WeightConfig(_Section):
    quality_exponent: float = Field(1.0, ge=0, description="weight factor = quality_score ** this")
    min_weight: float = Field(0.05, gt=0, description="weights are clipped to at least this (before targets)")
    max_weight: float = Field(20.0, gt=0, description="weights are clipped to at most this (before targets)")
    bucket_edges: list[float] = Field(
        [0.5, 1.0, 2.0], description="weight bucket boundaries; shards are grouped by category and bucket"
    )


class TokenizeConfig(_Section):
    model: Path | None = Field(None, description="SentencePiece model; None: no tokenized shards")
    partitions: int = Field(2, ge=1, description="Spark partitions writing shards (parts per shard group)")
    append_eos: bool = Field(True, description="append eos after each document")


class SparkConfig(_Section):
    master: str = Field("local[*]", description="Spark master; ignored when spark-submit already set one")
    app_name: str = Field("haina-data-prepare", description="Spark application name")
    shuffle_partitions: int = Field(8, ge=1, description="spark.sql.shuffle.partitions")
    driver_memory: str = Field("4g", description="spark.driver.memory (local mode)")
    conf: dict[str, str] = Field(
        {}, description="extra Spark settings; a local job on at most 256 MiB of input runs its JVM with the quick "
        "JIT only (-XX:TieredStopAtLevel=1) unless spark.driver.extraJavaOptions names a tier itself"
    )


StageName = Literal[
    "exact_dedup", "heuristics", "quality", "line_dedup", "near_dedup", "embedding", "safety", "category", "weighting",
]
STAGE_NAMES: tuple[str, ...] = get_args(StageName)  # the report's order


class PrepareConfig(_Section):
    input: InputConfig = Field(default_factory=InputConfig, description="input fields and bad-input limits")
    exact_dedup: ExactDedupConfig = Field(default_factory=ExactDedupConfig, description="stage 1")
    heuristics: HeuristicsConfig = Field(default_factory=HeuristicsConfig, description="stage 2")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="stage 3")
    line_dedup: LineDedupConfig = Field(default_factory=LineDedupConfig, description="stage 4")
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig, description="stage 5")
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig, description="stage 6")
    safety: SafetyConfig = Field(default_factory=SafetyConfig, description="stage 7")
    category: CategoryConfig = Field(default_factory=CategoryConfig, description="stage 8")
    weight: WeightConfig = Field(default_factory=WeightConfig, description="stage 9")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="stage 10")
    spark: SparkConfig = Field(default_factory=SparkConfig, description="Spark session")
    overwrite: bool = Field(False, description="replace an existing output directory")
    keep_intermediate: bool = Field(False, description="keep per-stage Parquet under stages/ in the output")
    stage_order: list[StageName] = Field(
        list(STAGE_NAMES), description="the order the stages run in (default the report's): every stage once, "
        "weighting last; exact and near dedup decide on the text as ingested wherever they stand"
    )

    @field_validator("stage_order")
    @classmethod
    def _order(cls, order: list[str]) -> list[str]:
        if sorted(order) != sorted(STAGE_NAMES):
            problems = []
            if missing := [s for s in STAGE_NAMES if s not in order]:
                problems.append(f"missing {', '.join(missing)}")
            if twice := sorted({s for s in order if order.count(s) > 1}):
                problems.append(f"repeated {', '.join(twice)}")
            raise ValueError(f"must name every stage once ({'; '.join(problems)})")
        if order[-1] != "weighting":
            raise ValueError("weighting must come last (it weighs what every other stage measured)")
        return order


def load_prepare_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PrepareConfig:
    """Read YAML (optional), apply ``a.b=value`` overrides, validate; ConfigError in one line otherwise."""
    data = read_yaml(path, what="config file", error=ConfigError) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    try:
        return PrepareConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(one_line_validation_error(exc, allowed_keys_of(PrepareConfig))) from None


def dump_prepare_config(config: PrepareConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
