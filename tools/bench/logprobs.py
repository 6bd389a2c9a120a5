"""Peak memory of the per-token log-probabilities and entropy an RL step needs, lean (chunk by chunk,
:func:`haina.plugins.align.token_logprobs.chunked_token_logps`) against full-vocabulary logits (what
rollouts computed before: ``log_softmax(hidden @ W^T)`` gathered at the targets).

    python -m haina.tools.bench.logprobs [--vocab 125696 --tokens 2048 --hidden 512 --chunk 1024]

One forward + backward of each on the same random fp32 inputs (hidden [tokens, hidden] and head weight
[vocab, hidden], both requiring grad), peak measured as in :mod:`haina.tools.bench.loss` (the profiler's
CPU allocations above what was live before); both also return the gradients, which count. Prints the
peaks, their ratio, and the largest difference of the two results.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from haina.plugins.align.token_logprobs import chunked_token_logps
from haina.tools.bench.loss import cpu_peak_bytes


def _full(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (logp.sum() + entropy.sum()).backward()
    return logp.detach(), entropy.detach()


def _lean(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = chunked_token_logps(hidden, weight, targets, chunk, entropy=True)
    assert out.entropy is not None
    (out.logp.sum() + out.entropy.sum()).backward()
    return out.logp.detach(), out.entropy.detach()


def measure(vocab: int, tokens: int, hidden_size: int, chunk: int, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    base_h = torch.randn(tokens, hidden_size, generator=g)
    base_w = torch.randn(vocab, hidden_size, generator=g) * hidden_size**-0.5
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    results = {}
    for name in ("full", "lean"):
        h, w = base_h.clone().requires_grad_(True), base_w.clone().requires_grad_(True)
        if name == "full":
            peak, out = cpu_peak_bytes(lambda h=h, w=w: _full(h, w, targets))
        else:
            peak, out = cpu_peak_bytes(lambda h=h, w=w: _lean(h, w, targets, chunk))
        results[name] = (peak, out)
    (full_peak, (fl, fe)), (lean_peak, (ll, le)) = results["full"], results["lean"]
    return {
        "full_peak_bytes": float(full_peak), "lean_peak_bytes": float(lean_peak),
        "ratio": full_peak / max(lean_peak, 1), "max_logp_diff": float((fl - ll).abs().max()),
        "max_entropy_diff": float((fe - le).abs().max()),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=125696)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args(argv)
    r = measure(args.vocab, args.tokens, args.hidden, args.chunk)
    gib = 2**30
    print(f"vocab {args.vocab:,}, {args.tokens:,} tokens, hidden {args.hidden}, chunk {args.chunk}")
    print(f"full logits: peak {r['full_peak_bytes'] / gib:.3f} GiB; lean: {r['lean_peak_bytes'] / gib:.3f} GiB; "
          f"ratio {r['ratio']:.1f}x; max |diff| log-prob {r['max_logp_diff']:.2e}, entropy {r['max_entropy_diff']:.2e}")
    return r


if __name__ == "__main__":
    main()
