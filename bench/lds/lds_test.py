#!/usr/bin/env python3
"""lds.py's core against slow, obvious definitions on fresh random inputs (standard library only; a ctest).

- ranks: rank(x_i) = #{j: x_j < x_i} + (#{j: x_j == x_i} + 1) / 2, with ties drawn on purpose;
- spearman without ties: 1 - 6 sum d^2 / (n (n^2 - 1));
- lds: a synthetic datamodel, truth_j = sum over S_j of e_i + small noise. The true effects e score near 1, their
  negation near -1, unrelated scores near 0, and a record left out of the scores counts 0.
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lds import lds, ranks, spearman, summary  # noqa: E402

seed = int.from_bytes(os.urandom(4), "little")
rng = random.Random(seed)
print(f"lds_test: seed {seed}")
fails = []


def check(ok, what):
    if not ok:
        fails.append(what)


for trial in range(20):
    n = rng.randint(2, 40)
    xs = [rng.choice([rng.random(), float(rng.randint(0, 3))]) for _ in range(n)]  # ties on purpose
    slow = [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]
    check(ranks(xs) == slow, f"ranks {xs}")
    a = rng.sample(range(1000), n)
    b = [rng.gauss(0, 1) for _ in range(n)]
    if n > 2:
        ra, rb = ranks(a), ranks(b)
        ref = 1 - 6 * sum((p - q) ** 2 for p, q in zip(ra, rb)) / (n * (n * n - 1))
        check(abs(spearman(a, b) - ref) < 1e-12, f"spearman n={n}: {spearman(a, b)} vs {ref}")
    check(abs(spearman(a, [3 * x + 1 for x in a]) - 1) < 1e-12, "monotone map")
    check(spearman(a, [7.0] * n) == 0.0, "constant")

N, M = 200, 60
records = [f"r{i}" for i in range(N)]
effect = {r: rng.gauss(0, 1) for r in records}
subsets = [rng.sample(records, N // 2) for _ in range(M)]
actual = {"q": [sum(effect[r] for r in s) + rng.gauss(0, 0.1) for s in subsets]}
good = lds({"q": effect}, subsets, actual)["q"]
bad = lds({"q": {r: -x for r, x in effect.items()}}, subsets, actual)["q"]
check(good > 0.95, f"true effects LDS {good}")
check(bad < -0.95, f"negated effects LDS {bad}")
noise = [lds({"q": {r: rng.gauss(0, 1) for r in records}}, subsets, actual)["q"] for _ in range(30)]
check(abs(sum(noise) / len(noise)) < 0.15, f"unrelated scores average {sum(noise) / len(noise)}")
partial = dict(effect)
dropped = records[0]
del partial[dropped]
want = spearman([sum(effect[r] for r in s if r != dropped) for s in subsets], actual["q"])
check(abs(lds({"q": partial}, subsets, actual)["q"] - want) < 1e-12, "missing record counts 0")
m, se = summary({"a": 0.2, "b": 0.4, "c": 0.9})
check(abs(m - 0.5) < 1e-12 and abs(se - (0.26 / 2 / 3) ** 0.5) < 1e-12, f"summary {m} {se}")

if fails:
    print("FAILED:\n  " + "\n  ".join(fails))
    sys.exit(1)
print(f"lds_test: ok (true effects {good:.3f}, negated {bad:.3f}, unrelated mean {sum(noise) / len(noise):.3f})")
