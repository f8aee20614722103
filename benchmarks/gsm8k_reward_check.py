"""Check the gsm8k reward against a whole GSM8K file: every reference must pass, every wrong answer fail.

For each record, through the same path as training (``load_reward`` + ``RewardSet``):

* the reference answer text as the completion must score 1.0 (the checker reads its own format);
* the same text with the number after ``####`` replaced by N+1 must score 0.0.

Default file: ``shared/data/sft/gsm8k_test.jsonl`` in the folder that holds the repository (``--path`` to
override). Prints the counts and every record that fails; exits 1 if any fails, 2 if the file is missing.

Usage: ``python benchmarks/gsm8k_reward_check.py [--path FILE.jsonl]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ironcore.rewards import RewardSet, RewardSpec, load_reward
from ironcore.rewards.gsm8k import reference_answer

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/sft/gsm8k_test.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=DEFAULT, help="GSM8K JSONL: {question, answer} a line")
    path = parser.parse_args().path
    if not path.is_file():
        print(f"{path}: no such file (pass --path to a GSM8K JSONL)", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [r["question"] for r in records]
    answers = [r["answer"] for r in records]
    references = [reference_answer(a) for a in answers]
    changed = [  # the final number changed: N -> N+1
        f"{a.rpartition('####')[0]}#### {ref + 1}" if ref is not None else a
        for a, ref in zip(answers, references)
    ]
    rewards = RewardSet([load_reward(RewardSpec("gsm8k"), "gsm8k")])
    right = rewards.score(prompts, answers, {"answer": answers}).total.tolist()
    wrong = rewards.score(prompts, changed, {"answer": answers}).total.tolist()

    failures = []
    for line, (ref, r, w) in enumerate(zip(references, right, wrong), start=1):
        if ref is None:
            failures.append(f"line {line}: no number after #### in {answers[line - 1][-40:]!r}")
        elif r != 1.0 or w != 0.0:
            failures.append(f"line {line}: reference {ref}: its text scored {r}, with N+1 it scored {w}")
    print(f"file: {path}")
    print(f"records: {len(records)}")
    print(f"parsed references: {sum(ref is not None for ref in references)}")
    print(f"matches (reference text scores 1.0): {sum(r == 1.0 for r in right)}")
    print(f"mismatches (final number + 1 scores 0.0): {sum(w == 0.0 for w in wrong)}")
    print(f"failures: {len(failures)}")
    for failure in failures:
        print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
