"""Keys and values of earlier positions, kept across forward calls for incremental decoding.

One :class:`KVCache` serves a whole model part: the model asks it for per-layer views
(:meth:`KVCache.layer`), each attention layer appends its new keys/values there, and after all layers ran
the model commits the step (:meth:`KVCache.commit`). Buffers are allocated on first use with the shape
the layer produces, so under tensor parallelism each rank caches only its own heads.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated [batch, heads, max_len, head_dim] keys/values per layer, plus per-slot segment ids.

    Segment ids mark which cached slots may be attended to (0 = padding); together with the slot order
    they give the attention mask of a decoding step (see :func:`attention_mask`).
    """

    def __init__(self, batch: int, max_len: int) -> None:
        self.batch, self.max_len = batch, max_len
        self.length = 0
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.positions: torch.Tensor | None = None  # [b, length]
        self.segments: torch.Tensor | None = None  # [b, length]

    def layer(self, name: str) -> LayerCache:
        return LayerCache(self, name)

    def keys_of(self, positions: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and segment ids of every key slot once ``positions``/``segments`` [b, s] are added."""
        if self.length + positions.shape[1] > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length + positions.shape[1]} asked")
        if self.positions is None:
            return positions, segments
        return torch.cat((self.positions, positions), 1), torch.cat((self.segments, segments), 1)

    def commit(self, positions: torch.Tensor, segments: torch.Tensor) -> None:
        self.positions, self.segments = self.keys_of(positions, segments)
        self.length += positions.shape[1]

    def _append(self, name: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._kv:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self._kv[name] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self._kv[name]
        end = self.length + k.shape[2]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


class LayerCache:
    """One layer's view of a :class:`KVCache`: append this step's k/v, get all keys/values so far."""

    def __init__(self, cache: KVCache, name: str) -> None:
        self.cache, self.name = cache, name

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache._append(self.name, k, v)


def attention_mask(q_segments: torch.Tensor, k_segments: torch.Tensor) -> torch.Tensor:
    """Boolean [b, q, k], True where query i may see key j.

    Queries are the last q of the k slots (earlier ones are cached). A query sees earlier-or-same slots of
    its own segment; segment 0 is padding and is seen by nobody. Every query also sees its own slot, so a
    padding query's softmax has one finite entry (its output is never used).
    """
    q_len, k_len = q_segments.shape[1], k_segments.shape[1]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=q_segments.device).tril(diagonal=k_len - q_len)
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    own = torch.zeros_like(causal)
    own[torch.arange(q_len), torch.arange(k_len - q_len, k_len)] = True
    return (causal & same) | own
