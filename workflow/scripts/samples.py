"""Generated samples of a checkpoint for the eval stage: one batched, seeded `ironcore generate` call.

Writes a Markdown page and a JSON list of {prompt, text}; with samples switched off in
configs/pipeline.yaml (eval.samples: false) it writes a note saying so instead. A generation
failure fails the job.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="run or checkpoint folder")
    parser.add_argument("--output", required=True, help="Markdown file")
    parser.add_argument("--output-json", required=True, help="JSON file")
    parser.add_argument("--enabled", action="store_true", help="generate (otherwise write a note that samples are off)")
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, so reruns give the same samples")
    args = parser.parse_args()

    samples, note = [], None
    if not args.enabled:
        note = "Samples are switched off (eval.samples: false in the pipeline config)."
    elif args.prompt:
        prompts = Path(args.output_json).with_suffix(".prompts.jsonl")
        prompts.write_text("".join(json.dumps(p) + "\n" for p in args.prompt))
        command = ["ironcore", "generate", "--checkpoint", args.checkpoint, "--prompts-file", str(prompts), "--json",
                   "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
                   "--seed", str(args.seed)]
        if args.top_k:
            command += ["--top-k", str(args.top_k)]
        done = subprocess.run(command, capture_output=True, text=True)
        prompts.unlink()
        if done.returncode != 0:
            print(f"ironcore generate failed:\n{done.stderr}", file=sys.stderr)
            return done.returncode
        for line in done.stdout.splitlines():
            result = json.loads(line)
            samples.append({"prompt": result["prompt"], "text": result["prompt"] + result["completion"]})

    Path(args.output_json).write_text(json.dumps({"note": note, "samples": samples}, indent=2) + "\n")
    Path(args.output).write_text(_markdown(args, samples, note))
    print(note or f"{len(samples)} samples written to {args.output}")
    return 0


def _markdown(args: argparse.Namespace, samples: list[dict[str, str]], note: str | None) -> str:
    lines = [f"# Samples of {args.checkpoint}", ""]
    if note:
        return "\n".join([*lines, note, ""])
    settings = (f"max {args.max_new_tokens} new tokens, temperature {args.temperature}, top-k {args.top_k}, "
                f"seed {args.seed}")
    lines += [f"`ironcore generate`, {settings}.", ""]
    for number, sample in enumerate(samples, 1):
        lines += [f"## Sample {number}", "", "Prompt:", "", "```", sample["prompt"], "```", "",
                  "Output:", "", "```", sample["text"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
