"""Which sequences run together: token budgets, the gathered-keys cap, prompt windows."""

from trainers.batching import length_batches, windows


def test_length_batches_sort_longest_first_within_the_padded_budget():
    lengths = [3, 10, 4, 9, 1]
    out = length_batches(lengths, batch_tokens=20)
    assert out == [[1, 3], [2, 0, 4]]  # 2 x 10 = 20 (a third: 30); then 3 x 4 = 12
    assert sorted(i for b in out for i in b) == list(range(5))
    assert all(len(b) * lengths[b[0]] <= 20 for b in out)
    assert length_batches([50], batch_tokens=20) == [[0]]  # too long for the budget: alone, never dropped


def test_length_batches_cap_batch_size_times_largest_extra():
    # responses of 2 tokens; their prompts' cached keys: 10, 40, 10, 10 tokens
    out = length_batches([2, 2, 2, 2], batch_tokens=100, extra=[10, 40, 10, 10], extra_tokens=80)
    assert out == [[0, 1], [2, 3]]  # [0, 1, 2] would hold 3 x 40 = 120 > 80 gathered prompt tokens
    assert all(len(b) * max([10, 40, 10, 10][i] for i in b) <= 80 for b in out)


def test_windows_hold_at_most_the_budget_of_prompt_tokens_longest_first():
    assert windows([5, 30, 10, 20], window_tokens=30) == [[1], [3, 2], [0]]
    assert windows([50, 5], window_tokens=30) == [[0], [1]]  # a prompt over the budget has a window of its own
    assert windows([], window_tokens=30) == []
