"""Show-and-Tell decoding: beam 1 is greedy, beam search finds the best sentence, batching changes nothing."""
from __future__ import annotations

import itertools

import torch

from topdown.captions import END_ID, PAD_ID, START_ID
from topdown.decoder import CaptionNet, ShowAndTell, beam_search, caption_loss, greedy_search

# A toy decoder whose next-word log-probabilities depend only on the previous word: a table.
# Words: 0 <pad>, 1 <start>, 2 <end>, 3 "a", 4 "b". Greedy takes "a" (0.6) first, but every
# continuation of "a" is poor; "b" (0.4) leads to "b <end>" with high probability.
P = torch.tensor([
    # <pad> <start> <end>  a     b
    [1e-9, 1e-9, 1.0, 1e-9, 1e-9],  # after <pad> (unused)
    [1e-9, 1e-9, 1e-9, 0.6, 0.4],   # after <start>
    [1e-9, 1e-9, 1.0, 1e-9, 1e-9],  # after <end> (unused)
    [1e-9, 1e-9, 0.3, 0.36, 0.34],  # after a
    [1e-9, 1e-9, 0.9, 0.05, 0.05],  # after b
]).log()


def toy_step(tokens, state):
    return P[tokens].clone(), state


def sequence_score(seq):
    score, prev = 0.0, START_ID
    for w in seq:
        score += float(P[prev, w])
        if w == END_ID:
            break
        prev = w
    return score


def best_by_enumeration(max_len):
    """The highest-scoring sentence among all of length <= max_len (ended or cut at max_len)."""
    cands = []
    for n in range(1, max_len + 1):
        for words in itertools.product((3, 4), repeat=n - 1):
            cands.append(list(words) + [END_ID])
        cands += [list(w) for w in itertools.product((3, 4), repeat=n) if n == max_len]
    return max(cands, key=sequence_score)


def test_beam_search_finds_the_best_sentence_of_a_toy_decoder():
    state = (torch.zeros(1, 2, 1),)
    g_tokens, g_score = greedy_search(toy_step, state, 2, 4)
    b_tokens, b_score = beam_search(toy_step, state, 2, beam_size=2, max_len=4)
    best = best_by_enumeration(4)
    assert best == [4, END_ID]
    assert b_tokens[0].tolist() == [4, END_ID, PAD_ID, PAD_ID] and b_tokens[1].tolist() == b_tokens[0].tolist()
    assert abs(float(b_score[0]) - sequence_score(best)) < 1e-5
    assert g_tokens[0, 0] == 3 and float(g_score[0]) < float(b_score[0])  # greedy misses it
    # exhaustive beam: every partial sentence kept, the top one is the enumeration's
    all_tokens, all_scores = beam_search(toy_step, state, 1, beam_size=16, max_len=4, return_all=True)
    assert all_tokens[0, 0].tolist()[:2] == best
    assert torch.all(all_scores[0][:-1] >= all_scores[0][1:])  # best first


def test_beam_1_is_greedy_and_batching_changes_nothing():
    torch.manual_seed(0)
    dec = ShowAndTell(32, 40, embed_dim=16, hidden_dim=24).eval()
    feats = torch.randn(64, 32) * 3
    greedy = dec.greedy(feats, 12)
    assert torch.equal(dec.beam_search(feats, beam_size=1, max_len=12), greedy)
    beam = dec.beam_search(feats, beam_size=3, max_len=12)
    one_by_one = torch.cat([dec.beam_search(feats[i:i + 1], 3, 12) for i in range(8)])
    assert torch.equal(beam[:8], one_by_one)
    # a beam sentence scores at least as high as the greedy one under the model
    def logp(tokens):
        state, total = dec.start(feats), torch.zeros(len(feats))
        prev = torch.full((len(feats),), START_ID)
        alive = torch.ones(len(feats), dtype=torch.bool)
        for t in range(tokens.shape[1]):
            lp, state = dec.step(prev, state)
            total += torch.where(alive, lp.gather(1, tokens[:, t:t + 1]).squeeze(1), torch.zeros(()))
            alive &= tokens[:, t] != END_ID
            prev = tokens[:, t]
        return total
    with torch.no_grad():
        assert torch.all(logp(beam) >= logp(greedy) - 1e-4)
        assert (beam != greedy).any()


def test_caption_net_heads_and_loss():
    net = CaptionNet("resnet18", num_objects=7, vocab_size=20).eval()
    images = torch.randn(2, 3, 32, 32)
    caps = torch.tensor([[START_ID, 5, 6, END_ID, PAD_ID]] * 6)  # 3 captions per image
    out = net(images, caps)
    assert out["features"].shape == (2, 512) and out["objects"].shape == (2, 7)
    assert out["caption"].shape == (6, 4, 20)
    loss = caption_loss(out["caption"], caps)
    manual = torch.nn.functional.cross_entropy(out["caption"][:, :3].reshape(-1, 20), caps[:, 1:4].reshape(-1))
    assert torch.allclose(loss, manual)  # <pad> targets are ignored
    assert net.decode(out["features"], beam_size=2, max_len=5).shape == (2, 5)
