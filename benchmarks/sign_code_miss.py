"""How often a pair at cosine c falls outside its query's k nearest 512-bit sign codes.

A binomial model, not a measurement: two unit vectors at cosine c differ in each sign bit of
a random rotation with probability acos(c) / pi, strangers with probability 1/2, independently
across bits. A pair is missed when at least k of the N strangers' codes are strictly nearer.
FindClusters on an approximate index (gallery/embedded/sweep.py) takes k = 64 from the codes
of the higher keys; Check's BinarySign512 takes rerank_candidates (64) from all of them.

    .venv/bin/python benchmarks/sign_code_miss.py --k 64 --codes 1000000 10000000
"""

from __future__ import annotations

import argparse
import math

BITS = 512


def binomial(n: int, p: float) -> list[float]:
    return [math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                     + i * math.log(p) + (n - i) * math.log(1 - p)) for i in range(n + 1)]


def at_least(mean: float, k: int) -> float:
    """P(Poisson(mean) >= k)."""
    below, term = 0.0, math.exp(-mean)
    for i in range(k):
        below += term
        term *= mean / (i + 1)
    return max(0.0, 1.0 - below)


def miss(cosine: float, codes: int, k: int) -> float:
    strangers = binomial(BITS, 0.5)
    nearer = [sum(strangers[:d]) for d in range(BITS + 1)]
    pair = binomial(BITS, math.acos(cosine) / math.pi)
    return sum(pair[d] * at_least(codes * nearer[d], k) for d in range(BITS + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--codes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--cosines", type=float, nargs="+",
                        default=[0.30, 0.35, 0.40, 0.45, 0.50])
    args = parser.parse_args()
    print(f"{'cosine':>6} " + " ".join(f"{n:>12,}" for n in args.codes))
    for cosine in args.cosines:
        print(f"{cosine:6.2f} " + " ".join(f"{miss(cosine, n, args.k):12.4%}"
                                           for n in args.codes))


if __name__ == "__main__":
    main()
