"""HH-RLHF pairs as TRL's conversational preference records (implicit prompt): each side a message list.

    python scripts/hh_rlhf_to_messages.py examples/data/hh_rlhf/hh_rlhf_harmless_300.jsonl \
        examples/data/hh_rlhf/hh_rlhf_harmless_chat.jsonl

A flat record ``{"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "chosen": " ...", "rejected": " ..."}`` becomes
``{"chosen": [{"role": "user", ...}, ..., {"role": "assistant", ...}], "rejected": [...]}``, the dialogue split at
its ``Human:``/``Assistant:`` markers; a pair whose turns do not alternate or whose sides are equal is left out.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TURN = re.compile(r"\n\n(Human|Assistant): ?")


def messages(dialogue: str) -> list[dict[str, str]]:
    parts = TURN.split(dialogue if dialogue.startswith("\n\n") else "\n\n" + dialogue)
    return [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
            for role, text in zip(parts[1::2], parts[2::2], strict=True)]


def usable(conversation: list[dict[str, str]]) -> bool:
    roles = [m["role"] for m in conversation]
    return bool(roles) and roles[-1] == "assistant" and all(m["content"] for m in conversation) and all(
        a != b for a, b in zip(roles, roles[1:], strict=False))


def main(source: Path, out: Path) -> None:
    kept = 0
    with out.open("w", encoding="utf-8") as file:
        for line in source.open(encoding="utf-8"):
            record = json.loads(line)
            chosen, rejected = (messages(record["prompt"] + record[side]) for side in ("chosen", "rejected"))
            if usable(chosen) and usable(rejected) and chosen != rejected:
                file.write(json.dumps({"chosen": chosen, "rejected": rejected}, ensure_ascii=False) + "\n")
                kept += 1
    print(f"{out}: {kept} pairs")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
