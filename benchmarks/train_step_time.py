"""Step time of the VESPO loss vs a plain GRPO loss on the same tiny MoE model and batch.

See `step_timing.py` for the setup (one learner, one fixed batch, losses interleaved step by step).
Reported: median and best step time per loss, tokens/s per rank (packed positions of the rank's
micro-batches / step time), and the ratio vespo / grpo. Target: VESPO within 2% of GRPO.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, verdict  # noqa: E402
from benchmarks.step_timing import parser, summary_rows, time_variants  # noqa: E402


def main() -> int:
    args = parser(__doc__.splitlines()[0], target=1.02).parse_args()
    times, config = time_variants(args, {"vespo": {"loss": "vespo", "params": None},
                                         "grpo": {"loss": "grpo", "params": None}})
    rows, medians = summary_rows(times)
    print(f"train step on {config.model.family} ({config.model.num_experts} experts), "
          f"world size {args.world_size}, {args.samples} sequences of {args.min_len}-{args.max_len} "
          f"tokens, {args.repeats} interleaved steps per loss after {args.warmup} warm-up")
    print_table(["loss", "median ms", "best ms", "tokens/s/rank"], rows)
    ratio = medians["vespo"] / medians["grpo"]
    print(f"RESULT vespo / grpo median step time = {ratio:.4f} (target <= {args.target}): "
          f"{verdict(ratio <= args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
