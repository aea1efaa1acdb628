"""mica_core.tokens against the loops in naive.py (spans, token-reward attribution, explicit
turn boundaries, broadcasting), numpy and torch."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mica_core as mc
from mica_core.tokens import (
    TurnSpans,
    broadcast_to_tokens,
    turn_of_token,
    turn_rewards_from_tokens,
    turn_spans,
)

import naive
from naive import broadcast_to_tokens as naive_broadcast

try:
    import torch
except ImportError:  # the numpy half of this file runs without torch
    torch = None

KINDS = ["numpy"] + (["torch"] if torch is not None else [])
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")
cuda_only = pytest.mark.skipif(torch is None or not torch.cuda.is_available(),
                               reason="needs a CUDA device")


def as_kind(x, kind, dtype=None):
    if kind == "numpy":
        return np.asarray(x, dtype=dtype)
    return torch.as_tensor(np.asarray(x, dtype=dtype))


def to_numpy(x):
    return x.cpu().numpy() if torch is not None and isinstance(x, torch.Tensor) else np.asarray(x)


def spans_loop(mask):
    """(row, start, end) of every run of ones, row-major: the obvious loop."""
    out = []
    for b, row in enumerate(mask):
        t = 0
        while t < len(row):
            if row[t]:
                s = t
                while t < len(row) and row[t]:
                    t += 1
                out.append((b, s, t))
            else:
                t += 1
    return out


masks = st.integers(1, 6).flatmap(lambda B: st.integers(1, 14).flatmap(
    lambda L: st.lists(st.lists(st.integers(0, 1), min_size=L, max_size=L), min_size=B,
                       max_size=B)))


@settings(max_examples=80, deadline=None)
@given(mask=masks, kind=st.sampled_from(KINDS), mask_dtype=st.sampled_from(
    [bool, np.int64, np.float32]), seed=st.integers(0, 2**16))
def test_broadcast_matches_naive(mask, kind, mask_dtype, seed):
    runs = spans_loop(mask)
    per_row = [sum(1 for r in runs if r[0] == b) for b in range(len(mask))]
    rng = np.random.default_rng(seed)
    adv_rows = [list(rng.normal(size=k)) for k in per_row]
    want = np.array(naive_broadcast([row + [0.0] for row in adv_rows], mask))
    m = as_kind(mask, kind, mask_dtype)
    flat = np.array([x for row in adv_rows for x in row], dtype=np.float64)
    got = broadcast_to_tokens(as_kind(flat, kind), m)
    np.testing.assert_array_equal(to_numpy(got), want)
    K = max(per_row) + 2
    padded = np.full((len(mask), K), 99.0)
    for b, row in enumerate(adv_rows):
        padded[b, :len(row)] = row
    got = broadcast_to_tokens(as_kind(padded, kind), m)
    np.testing.assert_array_equal(to_numpy(got), want)
    offsets = np.concatenate([[0], np.cumsum(per_row)])
    got = mc.broadcast_to_tokens(as_kind(flat, kind), m, offsets=offsets)
    np.testing.assert_array_equal(to_numpy(got), want)


@settings(max_examples=60, deadline=None)
@given(mask=masks, kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_spans_and_turn_rewards_match_loops(mask, kind, seed):
    runs = spans_loop(mask)
    s = turn_spans(as_kind(mask, kind))
    assert isinstance(s, TurnSpans)
    assert [tuple(map(int, x)) for x in zip(to_numpy(s.row), to_numpy(s.start),
                                              to_numpy(s.end))] == runs
    per_row = [sum(1 for r in runs if r[0] == b) for b in range(len(mask))]
    np.testing.assert_array_equal(to_numpy(s.offsets), np.concatenate([[0], np.cumsum(per_row)]))
    rng = np.random.default_rng(seed)
    rewards = np.zeros((len(mask), len(mask[0])))
    want = rng.normal(size=len(runs))
    want[::3] = 0.0  # a turn whose reward is exactly 0 is still a turn
    for (b, _, e), v in zip(runs, want):
        rewards[b, e - 1] = v
    got, spans = turn_rewards_from_tokens(as_kind(rewards, kind), as_kind(mask, kind))
    np.testing.assert_array_equal(to_numpy(got), want)
    np.testing.assert_array_equal(to_numpy(spans.last), [e - 1 for _, _, e in runs])


@pytest.mark.parametrize("kind", KINDS)
def test_turn_layout_is_scalar_times_mask(kind):
    mask = [[1, 0, 1, 1], [0, 1, 1, 0]]  # gaps inside a turn are allowed in this layout
    got = broadcast_to_tokens(as_kind([2.0, -1.0], kind), as_kind(mask, kind), layout="turn")
    np.testing.assert_array_equal(to_numpy(got), [[2, 0, 2, 2], [0, -1, -1, 0]])
    got = broadcast_to_tokens(as_kind([[2.0], [-1.0]], kind), as_kind(mask, kind),
                              layout="turn")
    np.testing.assert_array_equal(to_numpy(got), [[2, 0, 2, 2], [0, -1, -1, 0]])
    with pytest.raises(mc.MicaInputError, match="one value per row"):
        broadcast_to_tokens(as_kind([1.0, 2.0, 3.0], kind), as_kind(mask, kind), layout="turn")


@st.composite
def attribution_cases(draw):
    """A random mask, random explicit boundaries (or none) and rewards on random tokens at or
    after each row's first turn: on span ends, inside spans, on user tokens, densely."""
    B, L = draw(st.integers(1, 5)), draw(st.integers(1, 14))
    mask = [draw(st.lists(st.integers(0, 1), min_size=L, max_size=L)) for _ in range(B)]
    mode = draw(st.sampled_from(["runs", "turn_start", "turn_index"]))
    turn_start = turn_index = None
    if mode == "turn_start":
        # each row: a random subset of its assistant tokens that includes the first one
        turn_start = []
        for row in mask:
            ones = [j for j, m in enumerate(row) if m]
            keep = [j for j in ones[1:] if draw(st.booleans())]
            turn_start.append(ones[:1] + keep)
    elif mode == "turn_index":
        turn_index = []
        for row in mask:
            k, idx = draw(st.integers(0, 3)), []
            for _ in row:
                k += draw(st.sampled_from([0, 0, 1, 2]))
                idx.append(k)
            turn_index.append(idx)
    ids = naive.turn_of_token(mask, turn_start, turn_index)
    dense = draw(st.booleans())
    rewards = [[0.0] * L for _ in range(B)]
    for b in range(B):
        for j in range(L):
            if ids[b][j] >= 0 and (dense or draw(st.integers(0, 3)) == 0):
                rewards[b][j] = draw(st.sampled_from([0.0, 1.0, -0.5]) |
                                     st.floats(-3, 3, width=32))
    return mask, rewards, turn_start, turn_index


@settings(max_examples=120, deadline=None)
@given(case=attribution_cases(), kind=st.sampled_from(KINDS),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_token_rewards_attributed_like_the_loops(case, kind, dtype):
    mask, rewards, turn_start, turn_index = case
    ti = None if turn_index is None else as_kind(turn_index, kind, np.int64)
    ids = naive.turn_of_token(mask, turn_start, turn_index)
    np.testing.assert_array_equal(
        to_numpy(turn_of_token(as_kind(mask, kind), turn_start=turn_start, turn_index=ti)), ids)
    r = np.asarray(rewards, dtype=dtype)
    got, spans = turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind),
                                          turn_start=turn_start, turn_index=ti)
    want = naive.turn_rewards_from_tokens(r.tolist(), mask, turn_start, turn_index)
    assert to_numpy(got).dtype == dtype
    np.testing.assert_allclose(to_numpy(got), np.asarray([x for row in want for x in row],
                                                         dtype=dtype), rtol=1e-6, atol=1e-6)
    per_row = [len(row) for row in want]
    np.testing.assert_array_equal(to_numpy(spans.offsets), np.concatenate([[0],
                                                                           np.cumsum(per_row)]))
    # start: the first token of each turn; end: one past its last assistant token
    for i, (b, s, e) in enumerate(zip(*(to_numpy(x) for x in (spans.row, spans.start,
                                                               spans.end)))):
        k = i - int(to_numpy(spans.offsets)[b])
        members = [j for j in range(len(mask[b])) if mask[b][j] and ids[b][j] == k]
        assert (s, e) == (members[0], members[-1] + 1)
    # a turn's value lands on its assistant tokens only, gaps included
    vals = [list(np.arange(n) + 10.0 * b) for b, n in enumerate(per_row)]
    tok = broadcast_to_tokens(as_kind(np.asarray([x for v in vals for x in v]), kind),
                              as_kind(mask, kind), turn_start=turn_start, turn_index=ti)
    np.testing.assert_array_equal(to_numpy(tok), naive.broadcast_to_turn_tokens(
        vals, mask, turn_start, turn_index))


@pytest.mark.parametrize("kind", KINDS)
def test_verl_layouts_are_attributed_not_rejected(kind):
    """verl's score on a trailing user token, a KL penalty on every token, a turn reward on a
    span end: all summed into the turn that started last at or before them."""
    mask = [[1, 1, 0, 0, 1, 1, 0, 0]]
    r = np.zeros((1, 8))
    r[0, :] = -0.01          # dense KL-like term on every token
    r[0, 1] += 0.5           # a turn reward on the first span's last token
    r[0, 7] += 2.0           # verl's outcome score on the last (user) token
    got, _ = turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind))
    np.testing.assert_allclose(to_numpy(got), [0.5 - 0.04, 2.0 - 0.04])
    # a tool call inside the first turn: runs of ones make 3 turns, explicit boundaries 2
    mask = [[1, 0, 1, 0, 1, 1, 0]]
    r = np.zeros((1, 7))
    r[0, 2], r[0, 6] = 1.0, 3.0
    runs, _ = turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind))
    assert to_numpy(runs).tolist() == [0.0, 1.0, 3.0]
    starts, _ = turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind),
                                         turn_start=[[0, 4]])
    index, _ = turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind),
                                        turn_index=as_kind([[0, 0, 0, 0, 1, 1, 1]], kind))
    assert to_numpy(starts).tolist() == to_numpy(index).tolist() == [1.0, 3.0]
    tok = broadcast_to_tokens(as_kind([7.0, 8.0], kind), as_kind(mask, kind),
                              turn_start=[[0, 4]])
    assert to_numpy(tok).tolist() == [[7, 0, 7, 0, 8, 8, 0]]


@pytest.mark.parametrize("kind", KINDS)
def test_reward_before_the_first_turn_names_the_row(kind):
    mask = [[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]]
    r = np.zeros((3, 4))
    r[0, 3] = 1.0  # after row 0's turn: fine
    r[1, 1] = 0.5  # before row 1's first turn
    with pytest.raises(mc.MicaInputError, match="before the row's first assistant turn") as info:
        turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind))
    assert (info.value.column, info.value.row) == ("token_level_rewards", 1)
    assert "token 1" in str(info.value)
    r[1, 1] = 0.0
    r[2, 2] = float("nan")
    with pytest.raises(mc.MicaInputError, match="not finite") as info:
        turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind))
    assert info.value.row == 2
    r[2, 2] = 0.0
    mask[2] = [0, 0, 0, 0]
    r[2, 3] = 1.0
    with pytest.raises(mc.MicaInputError, match="row without any assistant token") as info:
        turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind))
    assert info.value.row == 2


@pytest.mark.parametrize("kind", KINDS)
def test_bad_turn_boundaries_name_the_row(kind):
    mask = as_kind([[1, 1, 0, 1], [0, 1, 1, 0]], kind)
    r = as_kind(np.zeros((2, 4)), kind)
    cases = [([[0, 2], [1]], "not an assistant token", 0),
             ([[0], [2]], "comes before the row's first turn start", 1),
             ([[3, 0], [1]], "must increase", 0),
             ([[0], [7]], "outside the response", 1),
             ([[0]], "one list of turn starts per response row", None)]
    for starts, msg, row in cases:
        with pytest.raises(mc.MicaInputError, match=msg) as info:
            turn_rewards_from_tokens(r, mask, turn_start=starts)
        assert info.value.row == row and info.value.column == "turn_start"
    # a [B, K] array padded with -1 works like lists
    got = turn_spans(mask, turn_start=np.array([[0, 3], [1, -1]]))
    assert to_numpy(got.start).tolist() == [0, 3, 1]
    with pytest.raises(mc.MicaInputError, match="lower than the previous") as info:
        turn_spans(mask, turn_index=as_kind([[1, 1, 0, 0], [0, 0, 0, 0]], kind))
    assert (info.value.column, info.value.row) == ("turn_index", 0)
    with pytest.raises(ValueError, match="not both"):
        turn_spans(mask, turn_start=[[0], [1]], turn_index=as_kind(np.zeros((2, 4), int), kind))


@pytest.mark.parametrize("kind", KINDS)
def test_span_without_a_reward_needs_reward_mask(kind):
    mask = [[1, 1, 0, 1], [0, 1, 1, 0]]
    r = np.zeros((2, 4))
    r[0, 1] = 1.0
    r[1, 2] = -1.0
    wrote = np.zeros((2, 4), dtype=bool)
    wrote[0, 1] = wrote[1, 2] = True  # row 0's second turn (token 3) got no reward
    with pytest.raises(mc.MicaInputError, match="has no reward") as info:
        turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind),
                                 reward_mask=as_kind(wrote, kind))
    assert (info.value.column, info.value.row) == ("reward_mask", 0)
    # without the mask, the 0 on token 3 is a reward of 0
    got, _ = turn_rewards_from_tokens(as_kind(r, kind), as_kind(mask, kind))
    np.testing.assert_array_equal(to_numpy(got), [1.0, 0.0, -1.0])


@pytest.mark.parametrize("kind", KINDS)
def test_turn_counts_that_do_not_match_are_named(kind):
    mask = as_kind([[1, 0, 1], [1, 1, 0]], kind)
    with pytest.raises(mc.MicaInputError, match="3 assistant spans"):
        broadcast_to_tokens(as_kind([1.0, 2.0], kind), mask)
    with pytest.raises(mc.MicaInputError, match="2 assistant spans") as info:
        broadcast_to_tokens(as_kind([[1.0], [2.0]], kind), mask)
    assert info.value.row == 0
    with pytest.raises(mc.MicaInputError, match="offsets give") as info:
        broadcast_to_tokens(as_kind([1.0, 2.0, 3.0], kind), mask, offsets=[0, 1, 3])
    assert info.value.row == 0
    with pytest.raises(mc.MicaInputError, match="2-D"):
        broadcast_to_tokens(as_kind([1.0], kind), as_kind([1, 0], kind))


@needs_torch
def test_estimate_then_broadcast_in_verl_layout():
    """Spans' offsets are estimate's trajectory offsets: the round trip keeps turn order."""
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0]])
    r = torch.zeros(3, 6)
    r[0, 1], r[0, 4], r[1, 0], r[2, 2], r[2, 4] = 1.0, 2.0, 0.5, -1.0, 3.0
    reward, spans = turn_rewards_from_tokens(r, mask)
    res = mc.estimate(spans.offsets, ["a", "a", "a"], reward=reward, estimator="mica_turn",
                      gamma=0.5)
    tok = mc.broadcast_to_tokens(res.returns, mask)
    # returns: row 0 [1 + 0.5*2, 2], row 1 [0.5], row 2 [-1 + 0.5*3, 3]
    want = [[2, 2, 0, 2, 2, 0], [0.5, 0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 3, 0]]
    np.testing.assert_allclose(tok.numpy(), want)
    assert tok.dtype == torch.float32


@cuda_only
def test_cuda_broadcast_without_validation_is_sync_free():
    dev = torch.device("cuda")
    mask = (torch.rand(64, 256, device=dev) > 0.4)
    n = int(turn_spans(mask).row.shape[0])  # finding spans syncs; broadcasting does not
    adv = torch.randn(n, device=dev, dtype=torch.float32)
    padded = torch.randn(64, 256, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = broadcast_to_tokens(adv, mask, validate=False)
        b = broadcast_to_tokens(padded, mask, validate=False)
        c = broadcast_to_tokens(adv[:64], mask, layout="turn")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = broadcast_to_tokens(adv.cpu(), mask.cpu())
    torch.testing.assert_close(a.cpu(), want)
    assert b.device.type == c.device.type == "cuda"


@cuda_only
def test_cuda_attribution_matches_cpu_and_is_deterministic():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 512, generator=g) > 0.3
    rew = torch.randn(64, 512, generator=g) * mask
    rew[:, -1] += 1.0  # a score on the last token of every row
    mask[:, 0] = True  # so that no reward lies before a row's first turn
    index = torch.cumsum(torch.rand(64, 512, generator=g) > 0.97, 1)
    for kw in ({}, {"turn_index": index}):
        want, spans = turn_rewards_from_tokens(rew.double(), mask, **kw)
        got = [turn_rewards_from_tokens(rew.double().to(dev), mask.to(dev),
                                        **{k: v.to(dev) for k, v in kw.items()})[0]
               for _ in range(2)]
        assert torch.equal(got[0], got[1])
        torch.testing.assert_close(got[0].cpu(), want)
        tok = broadcast_to_tokens(got[0], mask.to(dev), validate=False,
                                  **{k: v.to(dev) for k, v in kw.items()})
        torch.testing.assert_close(tok.cpu(), broadcast_to_tokens(want, mask, **kw))
