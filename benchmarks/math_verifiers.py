"""The math reward's verifiers on the shipped answer table, and their cost on a rollout batch.

1. Verdicts on benchmarks/math_answer_pairs.jsonl (fractions, decimals, percentages, degrees,
   units, tuples, intervals, sets, radicals, expressions, choices, text, LaTeX variants, malformed
   boxes, wrong answers), each labelled by hand: per verifier the rows it gets right, and every row
   where the verifiers disagree.
2. Cost: a batch of responses shaped like a DAPO-Math rollout (mostly integer references, some
   LaTeX; a share of distinct wrong answers), scored by Math-Verify called in this process (the
   plain call, baseline), by the worker pool with and without the fast path, and by the normaliser.
3. A hostile answer: what a comparison that would run for minutes costs with the pool's timeout.

    .venv/bin/python benchmarks/math_verifiers.py [--responses 2048] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from megatron_vespo.tasks.math_task import MathRewardConfig, MathVerifier

TABLE = Path(__file__).with_name("math_answer_pairs.jsonl")
VERIFIERS = {"math_verify": dict(fast_path=False), "math_verify+fast": dict(fast_path=True),
             "normalizer": dict(verifier="normalizer")}


def read_table(path: Path = TABLE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table_verdicts(rows: list[dict], workers: int) -> dict[str, list[float]]:
    out = {}
    for name, kw in VERIFIERS.items():
        verifier = MathVerifier(MathRewardConfig(workers=workers, **kw))
        try:
            out[name] = verifier.scores([r["response"] for r in rows], [r["reference"] for r in rows])
        finally:
            verifier.close()
    return out


def rollout_like(n: int, seed: int) -> tuple[list[str], list[str]]:
    """n (response, reference): 80% integer references (DAPO-Math-17k's), 20% LaTeX ones (MATH);
    half the answers right, in varied spellings, half wrong, all distinct per prompt group of 16."""
    rng = random.Random(seed)
    latex = [(r"\frac{%d}{%d}", lambda a, b: f"{a / b:.6f}"), (r"%d\sqrt{%d}", lambda a, b: rf"\sqrt{{{a * a * b}}}"),
             (r"(%d, %d)", lambda a, b: rf"\left( {a}, {b} \right)")]
    responses, references = [], []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        right = rng.random() < 0.5
        if rng.random() < 0.8:
            reference, answer = str(a), str(a if right else a + 1 + i % 16)
        else:
            form, alt = latex[i % len(latex)]
            reference = form % (a, b)
            answer = alt(a, b) if right else form % (a + 1 + i % 16, b)
        responses.append(f"Reasoning ... so the result is \\boxed{{{answer}}}.")
        references.append(reference)
    return responses, references


def in_process(responses: list[str], references: list[str]) -> float:
    """Math-Verify called here, one answer after another (no pool, no timeout)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    from megatron_vespo.tasks.math_answer import last_boxed

    start = time.perf_counter()
    for response, reference in zip(responses, references):
        gold = parse("\\boxed{" + reference + "}", extraction_config=[LatexExtractionConfig()])
        answer = parse("\\boxed{" + last_boxed(response) + "}",
                       extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
        verify(gold, answer)
    return time.perf_counter() - start


def pooled(responses: list[str], references: list[str], workers: int, **kw) -> tuple[float, object]:
    verifier = MathVerifier(MathRewardConfig(workers=workers, **kw))
    try:
        verifier.scores(responses[:workers], references[:workers])  # the workers' imports, untimed
        verifier._cache.clear()
        start = time.perf_counter()
        verifier.scores(responses, references)
        return time.perf_counter() - start, verifier.stats
    finally:
        verifier.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()

    rows = read_table()
    verdicts = table_verdicts(rows, args.workers)
    labels = [1.0 if r["equal"] else 0.0 for r in rows]
    print(f"1. {len(rows)} labelled answer pairs ({sum(labels):.0f} equal), {TABLE.name}")
    print(f"{'verifier':<18} {'right':>7} {'false +':>8} {'false -':>8}")
    for name, v in verdicts.items():
        fp = sum(1 for x, y in zip(v, labels) if x > 0 and y == 0)
        fn = sum(1 for x, y in zip(v, labels) if x <= 0 and y == 1)
        print(f"{name:<18} {len(rows) - fp - fn:>4}/{len(rows):<2} {fp:>8} {fn:>8}")
    agree = sum(1 for k in range(len(rows)) if verdicts["math_verify"][k] == verdicts["normalizer"][k])
    print(f"math_verify and normalizer agree on {agree}/{len(rows)}; where they differ:")
    for k, row in enumerate(rows):
        if len({v[k] for v in verdicts.values()}) > 1:
            marks = "  ".join(f"{name}={v[k]:.0f}" for name, v in verdicts.items())
            print(f"  [{row['category']}] {row['response']!r} vs {row['reference']!r} "
                  f"(label {int(row['equal'])}): {marks}")

    responses, references = rollout_like(args.responses, 0)
    print(f"\n2. {args.responses} rollout-like responses (80% integer references), "
          f"{args.workers} workers; seconds (per answer)")
    base = in_process(responses, references)
    print(f"{'scorer':<34} {'seconds':>8} {'ms/answer':>10} {'vs plain':>9}")
    print(f"{'math_verify in process (plain)':<34} {base:>8.2f} {1e3 * base / len(responses):>10.2f} {1.0:>8.2f}x")
    ratios = {}
    for name, kw in VERIFIERS.items():
        seconds, stats = pooled(responses, references, args.workers, **kw)
        ratios[name] = seconds / base
        print(f"{name + ' (pool)':<34} {seconds:>8.2f} {1e3 * seconds / len(responses):>10.2f} "
              f"{seconds / base:>8.2f}x")

    verifier = MathVerifier(MathRewardConfig(workers=1, timeout_s=args.timeout, fast_path=False))
    try:
        verifier.scores([r"\boxed{1}"], ["1"])  # the worker's imports, untimed
        start = time.perf_counter()
        score = verifier.scores([r"\boxed{9^{9^{9^{9^{9}}}} - 9^{9^{9^{9^{9}}}} + 1}"], ["2"])
        print(f"\n3. hostile answer: scored {score[0]:.0f} in {time.perf_counter() - start:.2f} s "
              f"(timeout {args.timeout} s); pool {verifier.stats}")
    finally:
        verifier.close()

    right = sum(1 for x, y in zip(verdicts["math_verify+fast"], labels) if (x > 0) == (y > 0))
    print(f"\nRESULT math_verify+fast right on {right}/{len(rows)} labelled pairs (target all): "
          f"{'PASS' if right == len(rows) else 'FAIL'}")
    ratio = ratios["math_verify+fast"]
    print(f"RESULT math_verify+fast in the pool / plain in-process call = {ratio:.2f}x "
          f"(target <= 1.0): {'PASS' if ratio <= 1.0 else 'FAIL'}")


if __name__ == "__main__":
    main()
