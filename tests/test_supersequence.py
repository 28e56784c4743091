"""The common layer sequence of pipeline stages, against brute force."""

import itertools
import random

import pytest

from uniap_jax import supersequence


def _is_subsequence(small, big):
  it = iter(big)
  return all(any(x == y for y in it) for x in small)


def _shortest_two(a, b):
  """Length of a shortest common supersequence of two sequences, by brute force."""
  items = a + b
  for n in range(max(len(a), len(b)), len(items) + 1):
    for cand in itertools.product(sorted(set(items)), repeat=n):
      if _is_subsequence(a, cand) and _is_subsequence(b, cand):
        return n
  return len(items)


@pytest.mark.parametrize("seed", range(40))
def test_every_stage_keeps_its_order_and_two_stages_merge_shortest(seed):
  rng = random.Random(seed)
  stages = [[rng.randrange(3) for _ in range(rng.randrange(1, 5))]
            for _ in range(rng.randrange(1, 4))]
  placed = supersequence.align(stages)
  for s, seq in enumerate(stages):
    # Each stage's items appear once each, in order, at positions carrying that item.
    indices = [where[s] for where in placed if s in where]
    assert indices == list(range(len(seq)))
  for where in placed:
    assert len({stages[s][i] for s, i in where.items()}) == 1  # one item per position
  if len(stages) == 2:
    assert len(placed) == _shortest_two(stages[0], stages[1])
  assert supersequence.align(stages) == placed  # a function of the input
