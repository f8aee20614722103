"""Greedy decoding on the compiled CPU path equals HF ``generate`` for every family of the parity tests.

The test suite compiles one family (each compilation costs seconds to a minute); this runs them all::

    python benchmarks/compiled_parity.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_hf_parity import CASES, _hf_model  # noqa: E402
from test_inference import NEW, PROMPTS  # noqa: E402

from ironcore.checkpoints.load import load_model  # noqa: E402
from ironcore.inference import DecodeReport, generate  # noqa: E402


def main() -> int:
    failed = []
    for case, spec in CASES.items():
        hf_model = _hf_model(spec)
        hf_model.generation_config.eos_token_id = None
        with tempfile.TemporaryDirectory() as folder:
            hf_model.save_pretrained(folder)
            model = load_model(folder)
        report = DecodeReport()
        started = time.perf_counter()
        ours = generate(model, PROMPTS, NEW, decode="compile", report=report)
        seconds = time.perf_counter() - started
        theirs = []
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                    pad_token_id=0)  # fmt: skip
            theirs.append(out[0, len(prompt) :].tolist())
        same = ours == theirs
        failed += [] if same else [case]
        print(f"{case:<24} {report.path}: {'same tokens as HF' if same else 'DIFFERENT from HF'} "
              f"(compiled in {report.compile_seconds:.1f} s of {seconds:.1f} s)", flush=True)  # fmt: skip
    print("all families equal HF" if not failed else f"different: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
