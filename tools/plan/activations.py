"""What one micro-batch keeps for backward, and the working memory around it, on one rank.

The terms are read off haina's own forward (Block, Attention, SwiGLU, RMSNorm, the position plugins and
the chunked losses), tensor by tensor, and were checked against the tensors autograd really saves
(``saved_tensors_hooks``, per block, fitted over 16 shapes to the byte) on CPU, torch 2.13. Per block,
N = rows x seq tokens, t = tp, e = bytes of the compute dtype:

- each RMSNorm keeps its input in fp32 (CUDA's fused kernel: that and the reciprocal rms; CPU, where
  torch decomposes rms_norm, also a second fp32 tensor of that size, the square or the normalized input):
  4 (CPU 8) bytes per element of [N / t_sp, h] (t_sp = t under sequence parallelism, else 1);
- attention keeps its (gathered, full-sequence) input, the packed QKV output, RoPE's rotated q and k,
  the kernel output and its log-sum-exp: e * N * (h + 3h/t + 2h/t + h/t) + 4 * rows * heads/t * seq;
- SwiGLU keeps its input (twice when autocast casts an fp32 stream for gate and up separately) and four
  [N, ffn/t] tensors (gate, silu, up, their product): e * N * (h + 4 ffn/t);
- matmul weights in the compute dtype: under autocast with fp32 parameters every block's weights are
  cast per forward and saved; under tp W_pack's row regroup is a new tensor (3h^2/t) that is saved.

The fused attention kernels (flash, memory-efficient, CPU's flash path, flex on CUDA) keep no
[heads, seq, seq] state, so ``selective`` recomputation (the kernel only) saves just the log-sum-exp;
``full`` keeps only each block's input and recomputes one block at a time in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from haina.core.config import ModelConfig

BUILTIN_KERNELS = ("auto", "sdpa", "flash", "xformers", "flex")


@dataclass(frozen=True)
class Micro:
    """One forward on one rank: its shape, layout and the dtypes it runs in (bytes per element)."""

    model: ModelConfig
    rows: int
    seq: int
    tp: int
    sp: bool
    stream: int  # the residual stream between blocks
    compute: int  # matmul inputs and outputs
    device: str  # "cuda" or "cpu"
    cast_weights: bool  # fp32 parameters under bf16 autocast: weights cast (and saved) per forward
    segments: bool = False  # packed documents (SFT): a masked attention

    @property
    def tokens(self) -> int:
        return self.rows * self.seq

    @property
    def norm_tokens(self) -> int:
        """Tokens a norm sees on this rank: a sequence shard under sequence parallelism."""
        return self.tokens // self.tp if self.sp and self.tp > 1 else self.tokens

    @property
    def heads(self) -> float:
        return self.model.num_heads / self.tp


def norm_saved(m: Micro) -> float:
    """Bytes one RMSNorm keeps: its fp32 input (and its fp32 square on CPU) and the [N] reciprocal rms."""
    per_element = 4 if m.device == "cuda" else 8
    return per_element * m.norm_tokens * m.model.hidden_size + 4 * m.norm_tokens


def kernel_state(m: Micro) -> float:
    """Bytes the attention kernel keeps beyond its q, k, v inputs: the log-sum-exp, and the scores where
    the kernel keeps them (flex's CPU backward, or a third-party kernel that says so)."""
    from haina.core.attention import kernel_spec

    kernel = m.model.attention
    lse = 4 * m.rows * m.heads * m.seq
    keeps_scores = (kernel == "flex" and m.device == "cpu") or (
        kernel not in BUILTIN_KERNELS and m.device in kernel_spec(kernel).saves_scores
    )
    return lse + (m.compute * m.rows * m.heads * m.seq**2 if keeps_scores else 0)


def _rotates(m: Micro) -> bool:
    """Whether the position plugin makes new q and k (RoPE) rather than passing them through (ALiBi)."""
    from haina.core.attention import position_bias_kind

    return position_bias_kind(m.model.position) != "alibi"


def weight_copies(m: Micro, block_tp_params: int) -> float:
    """Bytes of one block's weights held in the compute dtype for backward (see the module docstring)."""
    if m.cast_weights:
        return m.compute * block_tp_params
    if m.tp > 1:
        return m.compute * 3 * m.model.hidden_size**2 / m.tp  # W_pack's regrouped rows
    return 0.0


def block_saved(m: Micro, block_tp_params: int, mode: str = "none") -> float:
    """Bytes one block keeps for backward under activation checkpointing ``mode``."""
    h, f, n, t, e = m.model.hidden_size, m.model.ffn_size, m.tokens, m.tp, m.compute
    if mode == "full":
        return m.stream * m.norm_tokens * h  # the block's input only
    rope = _rotates(m)
    attention = e * n * h + e * n * (3 * h + (2 * h if rope else 0) + h) / t + kernel_state(m)
    mlp_inputs = 2 if (m.stream != m.compute) else 1  # autocast casts an fp32 stream once per consumer
    mlp = e * n * h * mlp_inputs + 4 * e * n * f / t
    cos_sin = 8 * m.seq * m.model.head_dim if rope else 0
    saved = 2 * norm_saved(m) + attention + mlp + cos_sin + weight_copies(m, block_tp_params)
    if mode == "selective":
        saved -= kernel_state(m)
    return saved


def block_working(m: Micro) -> float:
    """Backward's transient memory inside one block beyond what it saved: the gradients of the SwiGLU
    intermediates and of the block's inputs, and a weight gradient in the compute dtype before its cast."""
    h, f, n, t, e = m.model.hidden_size, m.model.ffn_size, m.tokens, m.tp, m.compute
    weight_grad = e * h * f / t if m.cast_weights else 0
    return 3 * e * n * f / t + 2 * e * n * h + 4 * m.norm_tokens * h + weight_grad


def dense_bias(m: Micro, kernel: str) -> tuple[float, float]:
    """(bytes saved for backward, bytes held during the forward) of the dense attention bias, built once per
    forward when the kernel takes one (sdpa, xformers) and there is something to bias (ALiBi, packing)."""
    from haina.core.attention import position_bias_kind

    takes_dense = kernel in ("sdpa", "xformers") or (kernel == "auto" and m.device != "cuda")
    alibi = position_bias_kind(m.model.position) == "alibi"
    if not takes_dense or not (alibi or m.segments):
        return 0.0, 0.0
    elements = (m.rows if m.segments else 1) * (m.heads if alibi else 1) * m.seq**2
    return m.compute * elements, (4 + m.compute) * elements


def forward_fixed(m: Micro, last_stage: bool, mode: str) -> float:
    """Bytes kept per forward outside the blocks: the final norm's input, the token ids, the bias."""
    saved_bias, held_bias = dense_bias(m, m.model.attention)
    bias = held_bias if mode == "full" else saved_bias  # checkpointing holds the mask info, fp32 bias too
    return (norm_saved(m) if last_stage else 0) + 8 * m.tokens + bias


# ------------------------------------------------------------------------------------------ the losses

@dataclass(frozen=True)
class LossMemory:
    """Bytes of a loss: ``state`` lives from its forward to the backward; ``transient`` only inside it."""

    state: float
    transient: float
    backward: float = 0.0  # at the start of backward, beside ``state``: the head weight's own backward
    note: str = ""


def _head_backward(m: Micro, head_bytes: int) -> float:
    """NormHead's normalization backward at the start of backward: the division's backward makes four fp32
    [vocab/tp, hidden] temporaries (the gradient over the norm, the squared norm expanded, two products;
    measured), after the fp32 copy of a bf16 incoming gradient."""
    if m.model.head != "normhead":
        return 0.0
    vh = m.model.vocab_size / m.tp * m.model.hidden_size
    return 16 * vh + (4 * vh if head_bytes < 4 else 0)


def chunked_lm_loss(m: Micro, chunk: int, head_bytes: int) -> LossMemory:
    """:func:`haina.core.loss.chunked_lm_loss` (pretrain, sft): d(loss)/d(hidden) and d(loss)/d(head) are
    made in the forward and kept for backward; one [chunk, vocab/tp] fp32 logits buffer at a time, plus its
    compute-dtype copy and the blocked head-gradient product when the accumulator is wider.

    ``head_bytes``: bytes per element of the head weight the loss sees (2 under FSDP2/DeepSpeed bf16, else 4).
    NormHead normalizes in fp32: a bf16 weight is copied to fp32 and kept by the normalization's backward."""
    h, v = m.model.hidden_size, m.model.vocab_size / m.tp
    n, c = m.tokens, min(chunk, m.tokens)
    wide = m.compute < 4  # a bf16 matmul summed into an fp32 head gradient
    grad_head = head_bytes * v * h
    norm_copy = 4 * v * h if (m.model.head == "normhead" and head_bytes < 4) else 0
    state = m.stream * n * h + grad_head + norm_copy  # d(loss)/d(hidden) has the hidden states' dtype
    # NormHead's fp32 normalized weight (held while the loss runs when the weight is fp32) and its cast
    weight_casts = (m.compute if head_bytes != m.compute else 0) * v * h + (
        4 * v * h if m.model.head == "normhead" and head_bytes == 4 else 0)
    accumulator = 4 * v * h if (wide and head_bytes < 4) else 0  # fp32 sum of a bf16 head gradient
    chunk_bytes = c * v * (4 + (2 * m.compute if wide else 0)) + (c * h * m.compute if m.stream != m.compute else 0)
    return LossMemory(state, weight_casts + accumulator + chunk_bytes, _head_backward(m, head_bytes))


def full_logits_loss(m: Micro, head_bytes: int = 4) -> LossMemory:
    """DPO's ``model(tokens, logits=slice(None))``: the head's full logits (gathered over tp), their fp32
    copy (under bf16) and log-softmax; the log-softmax is kept for backward, the rest lives during the forward, and the
    frozen reference's forward makes the same transient again while the policy's is kept. Backward starts
    with the log-softmax's gradient and its cast (6 bytes per logit), then the head weight's own."""
    elements = m.tokens * m.model.vocab_size
    copy = 4 if m.compute < 4 else 0  # .float() of bf16 logits
    return LossMemory(4 * elements, (m.compute + copy + 4) * elements,
                      max(6 * elements, _head_backward(m, head_bytes)),
                      note="DPO computes full [rows, seq, vocab] logits (no chunking)")


def chunked_logps(m: Micro, chunk: int, head_bytes: int) -> LossMemory:
    """Per-token log-probs of the trained actor (``token_logprobs``): hidden states and the effective head
    weight kept; backward recomputes [chunk, vocab/tp] logits and sums an fp32 head gradient."""
    h, v = m.model.hidden_size, m.model.vocab_size / m.tp
    c = min(chunk, m.tokens)
    state = m.stream * m.tokens * h + head_bytes * v * h + 12 * m.tokens
    transient = 4 * v * h + m.compute * v * h + c * v * (4 + m.compute) + m.stream * m.tokens * h
    return LossMemory(state, transient, _head_backward(m, head_bytes))
