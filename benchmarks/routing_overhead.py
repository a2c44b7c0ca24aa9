"""Step time of the tiny MoE with MoE routing metrics on vs off, on the same learner and batch.

See `step_timing.py` for the setup. The old policy is recomputed once with routing capture on (so
drift has its old routes); the "on" steps capture every router forward (ids, full softmax rows),
compute drift, agreement and expert-load sums and reduce them. Reported: median and best step time
per setting and the ratio on / off. Target: <= 1.05.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, verdict  # noqa: E402
from benchmarks.step_timing import parser, summary_rows, time_variants  # noqa: E402


def main() -> int:
    args = parser(__doc__.splitlines()[0], target=1.05).parse_args()
    times, config = time_variants(args, {"off": {"routing_metrics": False},
                                         "on": {"routing_metrics": True}},
                                  prepare={"routing_metrics": True})
    if not config.model.is_moe:
        raise SystemExit("routing metrics need an MoE model")
    rows, medians = summary_rows(times)
    print(f"train step on {config.model.family} ({config.model.num_experts} experts, "
          f"{config.model.num_hidden_layers} layers), world size {args.world_size}, {args.samples} "
          f"sequences of {args.min_len}-{args.max_len} tokens, {args.repeats} interleaved steps per "
          f"setting after {args.warmup} warm-up")
    print_table(["routing metrics", "median ms", "best ms", "tokens/s/rank"], rows)
    ratio = medians["on"] / medians["off"]
    print(f"RESULT routing metrics on / off median step time = {ratio:.4f} "
          f"(target <= {args.target}): {verdict(ratio <= args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
