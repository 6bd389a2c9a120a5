"""Configuration of the Baichuan 2 model layout, as ``haina export hf --format baichuan`` writes it.

Shipped inside an exported model directory and loaded by ``AutoConfig.from_pretrained(dir,
trust_remote_code=True)``; it imports only transformers and the standard library, so it runs without haina.

The fields are those of the Baichuan 2 release's config.json plus two the release leaves implicit:
``position_embedding`` ("rope" as in Baichuan 2 7B, "alibi" as in 13B; the release ships a different modeling
file for each) and ``rope_theta`` (the RoPE base). One modeling file serves both encodings by reading them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

POSITION_EMBEDDINGS = ("rope", "alibi")


class BaichuanConfig(PretrainedConfig):
    """Decoder shape, norm epsilon, position encoding and special token ids of a Baichuan-layout model.

    Attributes are set before the base class's ``__init__`` runs and the token ids are passed on to it too:
    transformers 4.x reads the ids from its keyword arguments, while 5.x keeps unknown keys as attributes and
    drops generation keys such as ``use_cache`` from them, so a value set directly survives both.
    """

    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 125696,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        model_max_length: int = 4096,
        max_position_embeddings: int | None = None,
        position_embedding: str = "rope",
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        z_loss_weight: float = 0.0,
        gradient_checkpointing: bool = False,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding {position_embedding!r}: expected rope or alibi")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of {num_attention_heads} heads")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.model_max_length = model_max_length
        # The 7B (RoPE) release's second name for the context length; the 13B (ALiBi) release has none.
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding = position_embedding
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.z_loss_weight = z_loss_weight
        self.gradient_checkpointing = gradient_checkpointing
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
