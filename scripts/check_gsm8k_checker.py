"""GSM8K's checker over a whole GSM8K file: 100 % on the reference answers, 0 % on the answers shuffled.

    python scripts/check_gsm8k_checker.py PATH/TO/gsm8k_test.jsonl    # the whole GSM8K test set (1,319)

The checker is the ``gsm8k`` reward (ironcore/rewards/gsm8k.py) that ``ironcore eval --task gsm8k=...`` and
the RL objective use. Each reference solution, given as the completion, must score 1; each item scored
against the next item's solution (a rotation) must score 0, except where the two final answers are the same
number, which the script counts and lists apart. Exit status 1 when either check fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ironcore.rewards.gsm8k import gsm8k_answer, reference_answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a GSM8K JSONL file ({question, answer})")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    answers = [row["answer"] for row in rows]
    questions = [row["question"] for row in rows]
    right = gsm8k_answer(questions, answers, answers)
    rotated = answers[1:] + answers[:1]
    wrong = gsm8k_answer(questions, rotated, answers)
    same_number = [i for i in range(len(rows)) if reference_answer(rotated[i]) == reference_answer(answers[i])]
    false_hits = [i for i, score in enumerate(wrong) if score == 1.0 and i not in same_number]
    print(f"{args.data}: {len(rows)} items")
    print(f"reference answers: {sum(right) / len(rows):.1%} right")
    print(f"shuffled answers: {sum(wrong) / len(rows):.1%} right ({len(same_number)} pairs share the final number "
          f"and count as right: items {same_number[:10]}); other hits: {len(false_hits)}")
    return 0 if sum(right) == len(rows) and not false_hits else 1


if __name__ == "__main__":
    raise SystemExit(main())
