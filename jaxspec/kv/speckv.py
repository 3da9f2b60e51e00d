"""``speckv``: KV dropping guided by a draft's lookahead (Galim et al., arXiv 2506.08373, §1 of
``shared/research/speckv.md``)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.api import InputError
from jaxspec.kv.snapkv import SnapKV
from jaxspec.models.sparse import VerticalSlash


@dataclasses.dataclass(frozen=True)
class SpecKV(SnapKV):
    """The draft greedily writes ``lookahead_tokens`` tokens (default: the request's ``max_new_tokens``;
    stops early at EOS, which stays in the lookahead). The target prefills prompt ⊕ lookahead; each earlier
    prompt entry is scored by the attention of the last ``window_size + 1`` prompt queries and every
    lookahead query (fp32 softmax over all keys), reduced by ``reduction_type`` over the GQA group and those
    queries jointly, pooled; per (layer, kv head) the top ``capacity - window_size`` of ``[0, n-W-1)`` and
    the window ``[n-W-1, n-1)`` are kept. The lookahead entries and the final prompt token's entry are
    dropped; the final prompt token is re-fed at its true position ``n - 1`` before decoding, so decoding
    starts from ``capacity + 1`` prompt entries (as the reference code does).

    Sparse prefill (the reference's, §1.4, pitfall P16). A row with ``N = n + lookahead >
    prefill_window_size + prefill_vertical_size`` that is scored (``n > capacity + 1``: the reference scores
    iff ``N > capacity + lookahead + 1``) is prefilled vertical-slash sparse: each layer first scores (a dense
    softmax of the scoring rows over all keys), then every query row, the scoring rows included, attends to
    a causal band of its last ``prefill_window_size + 1`` to ``+ 64`` keys (64-row blocks) plus the
    ``prefill_vertical_size`` best candidates of that layer's pooled scores per kv head
    (``jaxspec.models.sparse``). The switch is per row
    with static shapes: the sparse program runs only for a buffer longer than the threshold (below it the
    dense prefill is unchanged), and in it the other rows get the dense-equivalent pattern, exact for every
    query position ``<= prefill_window_size + prefill_vertical_size``: all of a row under the threshold,
    and every entry an unscored row keeps (its later lookahead queries affect nothing it keeps).
    """

    name = "speckv"
    summary = "target attention of the last window+1 prompt queries and a draft's lookahead, max-reduced"
    needs_draft = True
    lookahead = True

    capacity: int = 1024
    window_size: int = 32
    kernel_size: int = 7
    pool_type: str = "max"
    reduction_type: str = "max"
    lookahead_tokens: int | None = None
    prefill_window_size: int = 2048
    prefill_vertical_size: int = 2048

    def __post_init__(self):
        super().__post_init__()
        if self.reduction_type not in ("max", "mean"):
            raise InputError(f"{self.name}: reduction_type must be 'max' or 'mean', got {self.reduction_type!r}")
        if self.lookahead_tokens is not None and self.lookahead_tokens < 1:
            raise InputError(f"{self.name}: lookahead_tokens must be >= 1, got {self.lookahead_tokens}")
        if self.prefill_window_size < 0 or self.prefill_vertical_size < 0:
            raise InputError(f"{self.name}: prefill_window_size and prefill_vertical_size must be >= 0")
        if self.prefill_window_size % 64:
            raise InputError(f"{self.name}: prefill_window_size must be a multiple of 64, got "
                             f"{self.prefill_window_size}")
        if self.capacity > self.prefill_window_size + self.prefill_vertical_size:
            raise InputError(f"{self.name}: capacity ({self.capacity}) must be <= prefill_window_size + "
                             f"prefill_vertical_size ({self.prefill_window_size + self.prefill_vertical_size})")

    def query_rows(self, n, look_len, num_look, T):
        W = self.window_size
        return n - W - 1, W + 1 + look_len, W + 1 + num_look

    def window(self, n):
        end = n - 1  # the final prompt token is re-fed
        return jnp.where(n <= self.capacity, 0, end - self.window_size), end

    def sparse_prefill(self, n, look_len, T):
        P, V = self.prefill_window_size, self.prefill_vertical_size
        if T <= P + V:  # no row can exceed the threshold: the dense program
            return None
        rows = (n > self.capacity + 1) & (n + look_len > P + V)
        return VerticalSlash(P, V, self.kernel_size, self.pool_type), rows, self.window(n)[0]
