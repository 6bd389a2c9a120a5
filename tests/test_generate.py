"""KV-cache decoding, packed-sequence masking and sampling: each checked against the plain full forward."""

from __future__ import annotations

import pytest
import torch

from haina.core.config import load_config
from haina.core.generate import Sampling, filter_top_k_top_p, generate, left_pad, next_token
from haina.core.kv_cache import KVCache, attention_mask
from haina.core.model import Transformer


def _model(position: str) -> Transformer:
    cfg = load_config("tiny", [f"model.position={position}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_cached_decoding_gives_the_full_forward_logits(position: str) -> None:
    model = _model(position)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens, logits=slice(None))
        cache = KVCache(2, 16)
        pieces = [model(tokens[:, a:b], cache=cache, logits=slice(None)) for a, b in ((0, 6), (6, 7), (7, 13))]
    assert cache.length == 13
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_packed_documents_do_not_see_each_other(position: str) -> None:
    model = _model(position)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    segments = torch.tensor([[1] * 5 + [2] * 5 + [0] * 2])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0]])
    with torch.no_grad():
        packed = model(tokens, positions, segments=segments, logits=slice(None))
        first = model(tokens[:, :5], logits=slice(None))
        second = model(tokens[:, 5:10], logits=slice(None))
    torch.testing.assert_close(packed[:, :5], first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 5:10], second, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(packed).all()  # padding rows attend to themselves, not to nothing


def test_attention_mask_rules() -> None:
    q = torch.tensor([[1, 1, 2]])
    k = torch.tensor([[0, 1, 1, 1, 2]])  # padding, a cached slot, then the three query slots
    mask = attention_mask(q, k)[0]
    assert mask.tolist() == [
        [False, True, True, False, False],
        [False, True, True, True, False],
        [False, False, False, False, True],
    ]
    assert not mask[:, 0].any()  # padding is seen by nobody
    assert mask[2].tolist() == [False, False, False, False, True]  # segment 2 sees only itself
    assert not mask[0, 4]  # no looking ahead


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_batched_generation_of_different_lengths_matches_one_at_a_time(position: str) -> None:
    model = _model(position)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    greedy = Sampling(max_new_tokens=6, temperature=0)
    batched = generate(model, prompts, greedy, eos_id=2)
    for prompt, got in zip(prompts, batched, strict=True):
        tokens, expected = torch.tensor([prompt]), []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(tokens, logits=slice(-1, None))[0, -1].argmax())
                expected.append(nxt)
                if nxt == 2:
                    break
                tokens = torch.cat([tokens, torch.tensor([[nxt]])], 1)
        assert got == expected


def test_sampling_is_deterministic_for_a_seed_and_stops_at_eos() -> None:
    model = _model("rope")
    prompts = [[5, 6, 7], [8, 9]]
    hot = Sampling(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=3)
    first = generate(model, prompts, hot, eos_id=2)
    assert first == generate(model, prompts, hot, eos_id=2)
    assert first != generate(model, prompts, Sampling(**{**hot.__dict__, "seed": 4}), eos_id=2)
    eos = first[0][0]  # declare the first sampled token the eos: that row stops right there
    stopped = generate(model, prompts, hot, eos_id=eos)
    assert stopped[0] == [eos]


def test_top_k_top_p_and_repetition_penalty() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_top_k_top_p(logits, 0, 0.75))[0]
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.75 <= 0.5 + 0.3
    seen = torch.tensor([[True, False, False, False]])
    greedy = Sampling(max_new_tokens=1, temperature=0, repetition_penalty=10.0)
    assert int(next_token(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), seen, greedy, torch.Generator())) == 1
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_left_padding_layout() -> None:
    tokens, positions, segments = left_pad([[4, 5], [6, 7, 8]], pad_id=0, device=torch.device("cpu"))
    assert tokens.tolist() == [[0, 4, 5], [6, 7, 8]]
    assert positions.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert segments.tolist() == [[0, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1], []], 0, torch.device("cpu"))


def test_vocab_limit_keeps_draws_inside_the_tokenizer() -> None:
    model = _model("rope")
    limit = 40  # a tokenizer smaller than the model's (padded) vocabulary
    hot = Sampling(max_new_tokens=10, temperature=2.0, seed=1)
    out = generate(model, [[5, 6, 7], [8]], hot, eos_id=2, vocab_limit=limit)
    assert all(t < limit for row in out for t in row)
    assert any(t >= limit for row in generate(model, [[5, 6, 7], [8]], hot, eos_id=2) for t in row)


def test_row_seeds_draw_the_same_tokens_wherever_a_prompt_lands() -> None:
    """Per-prompt seeds: a prompt's sample does not depend on its batch-mates or its row (dp rollouts)."""
    import torch

    from haina.core.config import ModelConfig
    from haina.core.generate import Sampling, generate
    from haina.core.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, max_seq_len=32)).eval()
    model.init_weights()
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    sampling = Sampling(max_new_tokens=6, temperature=1.5)
    together = generate(model, prompts, sampling, eos_id=1, row_seeds=[10, 11, 12])
    alone = [generate(model, [p], sampling, eos_id=1, row_seeds=[s])[0] for p, s in zip(prompts, [10, 11, 12], strict=True)]
    reversed_rows = generate(model, prompts[::-1], sampling, eos_id=1, row_seeds=[12, 11, 10])[::-1]
    assert together == alone == reversed_rows
    assert generate(model, prompts, sampling, eos_id=1, row_seeds=[20, 21, 22]) != together
