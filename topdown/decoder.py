"""The multi-task captioning network of feedback-prop §4.4: one CNN trunk, an object head and a
Show-and-Tell LSTM decoder (Vinyals et al. 2015) after its last conv, with greedy and beam search.

Show and Tell feeds the image once, as the LSTM's first input ``x_{-1} = W_I CNN(I)``; the words
follow as ``x_t = W_e S_t`` (``S_0 = <start>``) and the LSTM's output at step t scores
``S_{t+1}``, ending with ``<end>``. Training uses teacher forcing; decoding keeps the LSTM state
after the image and runs one step per word.

Decoding is batched over images and beams: the only Python loop is over time steps. Beam search
keeps, for every image, the ``beam_size`` partial sentences of highest total log-probability;
a sentence that has emitted ``<end>`` is carried over unchanged (it may only append ``<pad>`` at
no cost), so finished and unfinished sentences compete on their sums as in Show and Tell. With
``beam_size=1`` it is greedy decoding.

:class:`CaptionNet` returns a dict of heads, ``{"features", "objects"}`` (and ``"caption"``, the
word logits, when captions are given), so :func:`topdown.feedback.feedback_prop` can read the
object head as the known evidence (``multilabel_known_loss(..., key="objects")``) while the
caption is decoded from the refined ``features``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topdown.backbones import _set_submodule, build_backbone
from topdown.captions import END_ID, PAD_ID, START_ID

State = tuple[Tensor, ...]
Step = Callable[[Tensor, State], tuple[Tensor, State]]  # (tokens [N], state) -> (log-probs [N, V], state)


# ---------------------------------------------------------------------------------------
# Search over any step function; states are tuples of tensors with the batch on dim 1 (nn.LSTM)
# ---------------------------------------------------------------------------------------

def _select(state: State, index: Tensor) -> State:
    return tuple(s.index_select(1, index) for s in state)


def greedy_search(step: Step, state: State, batch_size: int, max_len: int, start: int = START_ID,
                  end: int = END_ID, pad: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """The most likely word at every step. Returns ``tokens [B, max_len]`` (``<end>`` included
    when emitted, ``<pad>`` after it) and the sentences' total log-probabilities ``[B]``."""
    device = state[0].device
    tokens = torch.full((batch_size,), start, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    score = torch.zeros(batch_size, device=device)
    out = torch.full((batch_size, max_len), pad, dtype=torch.long, device=device)
    for t in range(max_len):
        logp, state = step(tokens, state)
        best, tokens = logp.max(-1)
        tokens = torch.where(done, torch.full_like(tokens, pad), tokens)
        score = score + torch.where(done, torch.zeros_like(best), best)
        out[:, t] = tokens
        done = done | (tokens == end)
        if bool(done.all()):
            break
    return out, score


def beam_search(step: Step, state: State, batch_size: int, beam_size: int, max_len: int, start: int = START_ID,
                end: int = END_ID, pad: int = PAD_ID, return_all: bool = False):
    """Batched beam search. ``state`` holds one row per image; it is repeated per beam here.

    Returns ``tokens [B, max_len]`` and ``scores [B]`` of each image's best sentence (the highest
    sum of log-probabilities, ``<end>`` included), or with ``return_all`` every beam,
    ``[B, k, max_len]`` and ``[B, k]``, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    b, k = batch_size, beam_size
    device = state[0].device
    state = tuple(s.repeat_interleave(k, dim=1) for s in state)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam at first: the others would repeat it
    tokens = torch.full((b * k,), start, dtype=torch.long, device=device)
    done = torch.zeros(b * k, dtype=torch.bool, device=device)
    seqs = torch.full((b * k, max_len), pad, dtype=torch.long, device=device)
    base = (torch.arange(b, device=device) * k).unsqueeze(1)
    for t in range(max_len):
        logp, state = step(tokens, state)
        v = logp.shape[-1]
        # a finished sentence continues only with <pad>, at no cost
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, pad] = 0.0
        logp = torch.where(done.unsqueeze(1), frozen, logp)
        cand = (scores.unsqueeze(2) + logp.view(b, k, v)).view(b, k * v)
        scores, flat = cand.topk(k, dim=1)
        rows = (base + torch.div(flat, v, rounding_mode="floor")).view(-1)
        tokens = (flat % v).view(-1)
        state = _select(state, rows)
        seqs = seqs.index_select(0, rows)
        done = done.index_select(0, rows)
        seqs[:, t] = tokens
        done = done | (tokens == end)
        if bool(done.all()):
            break
    seqs = seqs.view(b, k, max_len)
    if return_all:
        return seqs, scores
    return seqs[:, 0], scores[:, 0]


# ---------------------------------------------------------------------------------------
# Show and Tell
# ---------------------------------------------------------------------------------------

class ShowAndTell(nn.Module):
    """LSTM caption decoder of Vinyals et al. (2015): the image embedding is its first input only."""

    def __init__(self, feature_dim: int, vocab_size: int, embed_dim: int = 512, hidden_dim: int = 512,
                 num_layers: int = 1, dropout: float = 0.5):
        super().__init__()
        if vocab_size <= END_ID:
            raise ValueError(f"vocab_size must include the special words (>= 4), got {vocab_size}")
        self.image_embed = nn.Linear(feature_dim, embed_dim)
        self.word_embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def start(self, features: Tensor) -> State:
        """LSTM state after the image, ``x_{-1} = W_I CNN(I)`` (its output is not scored)."""
        _, state = self.lstm(self.dropout(self.image_embed(features)).unsqueeze(1))
        return state

    def forward(self, features: Tensor, captions: Tensor) -> Tensor:
        """Teacher forcing. ``captions [N, L]`` = ``<start> w_1 .. <end> <pad> ..``; returns the
        logits ``[N, L-1, V]`` of ``captions[:, 1:]``."""
        state = self.start(features)
        h, _ = self.lstm(self.dropout(self.word_embed(captions[:, :-1])), state)
        return self.out(self.dropout(h))

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        h, state = self.lstm(self.word_embed(tokens).unsqueeze(1), state)
        return F.log_softmax(self.out(h.squeeze(1)).float(), dim=-1), state

    @torch.no_grad()
    def greedy(self, features: Tensor, max_len: int = 16) -> Tensor:
        """Greedy captions ``[B, max_len]`` of a batch of image features."""
        return greedy_search(self.step, self.start(features), features.shape[0], max_len)[0]

    @torch.no_grad()
    def beam_search(self, features: Tensor, beam_size: int = 3, max_len: int = 16) -> Tensor:
        """Beam-search captions ``[B, max_len]`` (beam 1 gives :meth:`greedy`'s)."""
        return beam_search(self.step, self.start(features), features.shape[0], beam_size, max_len)[0]


def caption_loss(logits: Tensor, captions: Tensor) -> Tensor:
    """Mean cross-entropy of the words after ``<start>`` (``<end>`` included, ``<pad>`` ignored)."""
    target = captions[:, 1:logits.shape[1] + 1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=PAD_ID)


class CaptionNet(nn.Module):
    """Feedback-prop §4.4's multi-task CNN: a torchvision trunk (``trunk``, its classifier removed)
    and two heads after its last conv (``heads.objects``, ``heads.caption``).

    ``forward(images)`` returns ``{"features": [B, D], "objects": [B, K]}``; with ``captions``
    ``[B * C, L]`` (C captions per image, consecutive rows) also ``"caption"``, the word logits.
    Module names keep torchvision's under ``trunk.``, so paper layer names resolve
    (``conv10`` -> ``trunk.layer1``, the output of the first stage, on ResNet-50; :mod:`topdown.layers`).
    """

    def __init__(self, backbone: str = "resnet50", num_objects: int = 80, vocab_size: int = 10000,
                 weights: str | None = None, embed_dim: int = 512, hidden_dim: int = 512, dropout: float = 0.5,
                 partial_weights: bool = False):
        super().__init__()
        self.trunk = build_backbone(backbone, 1, weights=weights, partial_weights=partial_weights)
        head = self.trunk.get_submodule(self.trunk.topdown_head)
        feature_dim = head.in_features
        _set_submodule(self.trunk, self.trunk.topdown_head, nn.Identity())
        self.feature_dim = feature_dim
        self.heads = nn.ModuleDict({
            "objects": nn.Linear(feature_dim, num_objects),
            "caption": ShowAndTell(feature_dim, vocab_size, embed_dim, hidden_dim, dropout=dropout),
        })

    def forward(self, images: Tensor, captions: Tensor | None = None) -> dict[str, Tensor]:
        features = torch.flatten(self.trunk(images), 1)
        out = {"features": features, "objects": self.heads["objects"](features)}
        if captions is not None:
            per_image = captions.shape[0] // features.shape[0]
            out["caption"] = self.heads["caption"](features.repeat_interleave(per_image, 0), captions)
        return out

    def decode(self, features: Tensor, beam_size: int = 3, max_len: int = 16) -> Tensor:
        """Captions ``[B, max_len]`` from trunk features: greedy for ``beam_size=1``, else beam search."""
        dec = self.heads["caption"]
        return dec.greedy(features, max_len) if beam_size == 1 else dec.beam_search(features, beam_size, max_len)
