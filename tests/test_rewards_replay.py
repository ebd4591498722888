import random

import pytest

from raro_fast.replay import CriticPair, ReplayBuffer
from raro_fast.rewards import group_advantages, mean_or_none, verdict_rewards


@pytest.mark.parametrize(
    "verdict,pos,expected",
    [
        ("1", 1, (0.0, 1.0)),  # critic picked the expert
        ("2", 2, (0.0, 1.0)),
        ("2", 1, (1.0, 0.0)),  # critic picked the policy answer
        ("1", 2, (1.0, 0.0)),
        ("tie", 1, (0.6, 0.55)),
        ("tie", 2, (0.6, 0.55)),
        (None, 1, (None, 0.0)),  # unparseable: no policy reward at all, critic nothing
    ],
)
def test_verdict_rewards(verdict, pos, expected):
    assert verdict_rewards(verdict, pos, tau_pol=0.6, tau_crit=0.55) == expected


def test_verdict_rewards_old_tie_rule_and_bad_rule():
    assert verdict_rewards(None, 2, tau_pol=0.6, tau_crit=0.55, invalid="tie") == (0.6, 0.0)
    with pytest.raises(ValueError, match="invalid must be one of"):
        verdict_rewards(None, 2, tau_pol=0.6, tau_crit=0.55, invalid="skip")


def test_group_advantages_none_takes_the_group_mean():
    adv = group_advantages([0.6, None, 0.0, 0.0, None, None], [0, 0, 0, 0, 1, 1])
    assert adv == pytest.approx([0.4, 0.0, -0.2, -0.2, 0.0, 0.0])
    adv_std = group_advantages([1.0, None, 0.0], [0, 0, 0], std_normalize=True)
    assert adv_std[1] == 0.0 and adv_std[0] == pytest.approx(0.5 / (0.5**0.5 + 1e-6))


@pytest.mark.parametrize("verdict", ["3", "0", "-1", " 2", "Tie", ""])
def test_verdict_rewards_refuses_other_verdicts(verdict):
    """Any integer but the expert's position used to pay the policy (1.0, 0.0); "Tie" raised from int()."""
    with pytest.raises(ValueError, match="verdict must be"):
        verdict_rewards(verdict, 1, tau_pol=0.6, tau_crit=0.55)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_reward_that_is_not_finite_is_refused_naming_it(bad):
    """A NaN or infinite reward made its whole group's advantages NaN; the step was skipped and the run stopped on
    'loss or gradient was not finite'."""
    with pytest.raises(ValueError, match=r"reward 1 \(group 0\) is (nan|inf|-inf)"):
        group_advantages([1.0, bad, 0.0, 1.0], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="reward 1 is"):
        mean_or_none([1.0, bad])
    assert mean_or_none([1.0, None, 0.0]) == 0.5 and mean_or_none([None]) is None


def test_verdict_rewards_rejects_bad_position():
    with pytest.raises(ValueError, match="expert_position"):
        verdict_rewards("1", 3, tau_pol=0.6, tau_crit=0.55)


def test_group_advantages_mean_only_and_std():
    rng = random.Random(3)
    rewards = [rng.random() for _ in range(9)]
    groups = [0, 0, 0, 1, 1, 1, 1, 2, 3]
    adv = group_advantages(rewards, groups)
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        mean = sum(rewards[i] for i in idx) / len(idx)
        for i in idx:
            assert adv[i] == pytest.approx(rewards[i] - mean, abs=1e-12)
    assert adv[7] == 0.0 and adv[8] == 0.0  # groups of one carry no signal
    adv_std = group_advantages(rewards, groups, std_normalize=True)
    idx = [0, 1, 2]
    mean = sum(rewards[i] for i in idx) / 3
    std = (sum((rewards[i] - mean) ** 2 for i in idx) / 2) ** 0.5
    assert adv_std[0] == pytest.approx((rewards[0] - mean) / (std + 1e-6), rel=1e-9)


def test_replay_fifo_sample_and_state_roundtrip():
    buf = ReplayBuffer(5)
    pairs = [CriticPair(f"id{i}", f"q{i}", f"a{i}", f"e{i}") for i in range(8)]
    buf.extend(pairs)
    assert len(buf) == 5
    items = buf.state_dict()["items"]
    assert [p["example_id"] for p in items] == [f"id{i}" for i in range(3, 8)]  # the oldest were dropped
    s1 = buf.sample(3, random.Random(0))
    clone = ReplayBuffer(1)
    clone.load_state_dict(buf.state_dict())
    assert clone.sample(3, random.Random(0)) == s1
    assert len(set(s1)) == 3
    assert len(buf.sample(10, random.Random(1))) == 5


def test_ranks_replay_disjoint_pairs_and_one_rank_draws_as_before():
    # Found by review: each rank drew from the same buffer with its own generator, so two ranks could replay the
    # same pair in one step (2 of 8 draws in the reviewer's run). The ranks now deal one shuffle out.
    buf = ReplayBuffer(100)
    buf.extend([CriticPair(f"id{i}", f"q{i}", f"a{i}", f"e{i}") for i in range(8)])
    drawn = [buf.sample(4, random.Random("step 3"), part=rank, shares=[4, 4]) for rank in (0, 1)]
    assert [len(d) for d in drawn] == [4, 4] and not set(drawn[0]) & set(drawn[1])
    thirds = [buf.sample(0, random.Random("step 3"), part=rank, shares=[3, 3, 2]) for rank in range(3)]
    assert [len(t) for t in thirds] == [3, 3, 2] and len(set().union(*thirds)) == 8
    with pytest.raises(ValueError, match=r"replay shares \[5, 4\] ask for more than the 8 pairs held"):
        buf.sample(5, random.Random(0), part=0, shares=[5, 4])
    # one rank: the same draws as before the change (the published runs' replay)
    items = [CriticPair(f"id{i}", f"q{i}", f"a{i}", f"e{i}") for i in range(8)]
    assert buf.sample(3, random.Random(7)) == [items[i] for i in sorted(random.Random(7).sample(range(8), 3))]


def test_a_rank_may_take_more_than_its_fraction_of_the_buffer():
    """Found by review: rank r took every parts-th pair of the shuffle, so with demands [8, 0] on a buffer of 8,
    two ranks replayed 4 pairs where one rank replays 8 (and the critic's share of the gradient shrank)."""
    buf = ReplayBuffer(100)
    buf.extend([CriticPair(f"id{i}", "q", "a", "e") for i in range(8)])
    drawn = [buf.sample(n, random.Random(3), part=rank, shares=[8, 0]) for rank, n in enumerate((8, 0))]
    assert [len(d) for d in drawn] == [8, 0]


def test_each_rank_draws_k_pairs_from_the_whole_buffer():
    # Each rank's slice comes from one shuffle of the whole buffer: unshuffled, a rank would replay the same few
    # oldest pairs every step, the rest never. Over 200 steps each of the 20 pairs is expected 20 times on rank 0.
    buf = ReplayBuffer(100)
    buf.extend([CriticPair(f"id{i}", "q", "a", "e") for i in range(20)])
    counts = {}
    for step in range(200):
        drawn = buf.sample(2, random.Random(step), part=0, shares=[2, 2])
        assert len(drawn) == 2
        for p in drawn:
            counts[p.example_id] = counts.get(p.example_id, 0) + 1
    assert len(counts) == 20 and max(counts.values()) < 40


def test_a_loaded_buffer_keeps_its_capacity():
    # Resuming must not turn the FIFO unbounded: the next pair still evicts the oldest.
    buf = ReplayBuffer(5)
    buf.extend([CriticPair(f"id{i}", "q", "a", "e") for i in range(5)])
    clone = ReplayBuffer(5)
    clone.load_state_dict(buf.state_dict())
    clone.extend([CriticPair("new", "q", "a", "e")])
    assert [p["example_id"] for p in clone.state_dict()["items"]] == ["id1", "id2", "id3", "id4", "new"]


def test_replay_zero_capacity_and_bad_capacity():
    buf = ReplayBuffer(0)
    buf.extend([CriticPair("a", "b", "c", "d")])
    assert len(buf) == 0
    with pytest.raises(ValueError, match="replay_size"):
        ReplayBuffer(-1)


def test_replay_share_is_exact_in_expectation_for_few_fresh_pairs():
    import random

    from raro_fast.config import load_config

    rc = load_config(["--raro.replay_ratio", "0.3"]).raro
    rng = random.Random(0)
    draws = [rc.replay_pairs_for(1, rng) for _ in range(20000)]
    assert set(draws) == {0, 1} and abs(sum(draws) / len(draws) - 3 / 7) < 0.01  # 1 x 0.3 / 0.7; rounded: 0
    half = load_config([]).raro  # the default 0.5: whole numbers, and no random draw (runs stay as they were)
    state = rng.getstate()
    assert [half.replay_pairs_for(n, rng) for n in (0, 1, 7)] == [0, 1, 7] and rng.getstate() == state


def test_ranks_take_consecutive_slices_of_one_shuffle_in_buffer_order():
    # Exactly the documented deal: rank r takes order[sum(shares[:r]) : sum(shares[:r + 1])] of one shuffle of the
    # buffer (seeded alike on every rank), returned in buffer order; shares summing to less than the buffer leave
    # its tail of the shuffle undealt.
    buf = ReplayBuffer(100)
    items = [CriticPair(f"id{i}", f"q{i}", f"a{i}", f"e{i}") for i in range(8)]
    buf.extend(items)
    order = list(range(8))
    random.Random("step 3").shuffle(order)
    assert order == [1, 4, 5, 6, 2, 3, 7, 0]
    drawn = [buf.sample(0, random.Random("step 3"), part=rank, shares=[2, 1, 2]) for rank in range(3)]
    assert drawn == [[items[1], items[4]], [items[5]], [items[2], items[6]]]
