"""The layer sequence every pipeline stage runs: a common supersequence of theirs.

The pipeline runs one SPMD program on every stage, so stages that hold different
layers share one sequence of layer positions, each stage skipping the positions it
does not own. `apply` builds its program from it and `cost` charges what that program
runs, so both take it from here: one function, one answer.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def align(sequences: Sequence[Sequence[Hashable]]) -> list[dict[int, int]]:
  """Positions (stage -> index into that stage's sequence) of a common supersequence.

  Folds the stages in order, each time merging by a shortest common supersequence of
  the items; every stage's sequence appears in order. Ties keep the merged sequence's
  item first, so the result is a function of the input alone.
  """
  merged: list[tuple[Hashable, dict[int, int]]] = [
      (k, {0: i}) for i, k in enumerate(sequences[0])]
  for s in range(1, len(sequences)):
    a = [k for k, _ in merged]
    b = list(sequences[s])
    n, m = len(a), len(b)
    # dp[i][j]: length of a shortest common supersequence of a[i:] and b[j:].
    dp = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n, -1, -1):
      for j in range(m, -1, -1):
        if i == n or j == m:
          dp[i][j] = (n - i) + (m - j)
        elif a[i] == b[j]:
          dp[i][j] = 1 + dp[i + 1][j + 1]
        else:
          dp[i][j] = 1 + min(dp[i + 1][j], dp[i][j + 1])
    out, i, j = [], 0, 0
    while i < n or j < m:
      if i < n and j < m and a[i] == b[j]:
        out.append((a[i], {**merged[i][1], s: j}))
        i, j = i + 1, j + 1
      elif j == m or (i < n and dp[i + 1][j] <= dp[i][j + 1]):
        out.append(merged[i])
        i += 1
      else:
        out.append((b[j], {s: j}))
        j += 1
    merged = out
  return [where for _, where in merged]
