"""Data mixtures (``data.blend``): exact shares, a mapping that resume and the DP layout leave unchanged, one-line
errors, and a tiny run that trains on a blend, validates each data set and reports the mixture it drew."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from run_helpers import TINY_MODEL, read_metrics, shakespeare_slice, small_run_config

from ironcore.config import build_config
from ironcore.data.preprocessing.config import load_data_config
from ironcore.data.preprocessing.preprocess import preprocess
from ironcore.data.samples.batches import StepBatches
from ironcore.data.samples.blend import BlendedDataset
from ironcore.errors import ConfigError
from ironcore.evaluation.validation import evaluate_checkpoint
from ironcore.training.tracking import tracked_names
from ironcore.training.trainer import Trainer


class Numbered(torch.utils.data.Dataset):
    """``size`` samples ``{"id": [source, index]}``: which sample a batch holds, and nothing else."""

    def __init__(self, source: int, size: int) -> None:
        self.source, self.size = source, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"id": torch.tensor([self.source, index])}


def blend(size: int = 4000, seed: int = 5) -> BlendedDataset:
    return BlendedDataset([Numbered(0, 130), Numbered(1, 70)], [7.0, 3.0], size, seed)


def test_shares_follow_the_weights_and_each_source_is_drawn_epoch_by_epoch() -> None:
    data = blend()
    drawn = np.array([data.locate(i) for i in range(len(data))])
    in_a = np.cumsum(drawn[:, 0] == 0)
    # The greedy interleaving keeps every prefix within one sample of 70 % (a random draw would stray by ~20).
    assert np.abs(in_a - 0.7 * np.arange(1, len(data) + 1)).max() <= 1.0
    for source, size in ((0, 130), (1, 70)):
        within = drawn[drawn[:, 0] == source, 1]
        first, second = within[:size], within[size : 2 * size]
        assert sorted(first) == list(range(size)) and sorted(second) == list(range(size))  # each sample once an epoch
        assert list(first) != list(second) and list(first) != list(range(size))  # reshuffled each epoch


def _steps(data: BlendedDataset, dp_size: int, steps: range) -> list[torch.Tensor]:
    """The sample ids of each global batch as the ranks of a ``dp_size`` layout take them, in rank order."""
    ranks = [StepBatches(data, global_batch_size=8, micro_batch_size=2, device=torch.device("cpu"), dp_rank=r,
                         dp_size=dp_size) for r in range(dp_size)]  # fmt: skip
    return [torch.cat([mb["id"] for r in ranks for mb in r.step(step * 8)]) for step in steps]


def test_mapping_is_the_same_after_a_resume_and_at_any_dp_layout() -> None:
    whole = _steps(blend(), 1, range(40))
    resumed = _steps(blend(), 1, range(25, 40))  # a fresh process that starts at step 25
    assert all(torch.equal(a, b) for a, b in zip(whole[25:], resumed))
    assert all(torch.equal(a, b) for a, b in zip(whole, _steps(blend(), 2, range(40))))
    assert not torch.equal(torch.cat(whole), torch.cat(_steps(blend(seed=6), 1, range(40))))  # the seed matters


@pytest.fixture(scope="module")
def data_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """'shakespeare-slice' and 'other' (one tokenizer), and 'foreign' (a tokenizer of its own)."""
    root = tmp_path_factory.mktemp("blend")
    (root / "a").mkdir()
    (root / "foreign").mkdir()
    first = shakespeare_slice(root / "a", 24_000)
    other = yaml.safe_load(first.read_text())
    (root / "b.txt").write_text((Path(__file__).parents[1] / "examples/data/tinyshakespeare.txt").read_text()[
        60_000:72_000])
    other.update(name="other", source={"path": str(root / "b.txt"), "document_split": "paragraph"},
                 tokenizer={"path": str(root / "a" / "out")}, output_dir=str(root / "b_out"))
    (root / "b.yaml").write_text(yaml.safe_dump(other))
    preprocess(load_data_config(root / "b.yaml"), progress=False)
    foreign = shakespeare_slice(root / "foreign", 12_000, start=100_000)
    foreign_cfg = yaml.safe_load(foreign.read_text())
    foreign.write_text(yaml.safe_dump({**foreign_cfg, "name": "foreign"}))
    return {"a": first, "b": root / "b.yaml", "foreign": foreign, "root": root}


def _config(data_sets: dict[str, Path], blend: list[dict], steps: int = 4, **overrides: object):
    return small_run_config(TINY_MODEL, data_sets["a"], data_sets["root"] / "run", steps,
                            data__config_path=None, data__blend=blend, **overrides)  # fmt: skip


def test_bad_blends_are_one_line(data_sets: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"data\.blend': give data.config_path or data.blend, not both"):
        build_config({"data": {"config_path": str(data_sets["a"]),
                               "blend": [{"config_path": str(data_sets["b"]), "weight": 1}]}})
    for weight in (0, -1):
        with pytest.raises(ConfigError, match=r"data\.blend\[1\]\.weight': must be a positive number"):
            _config(data_sets, [{"config_path": str(data_sets["a"]), "weight": 1},
                                {"config_path": str(data_sets["b"]), "weight": weight}])
    with pytest.raises(ConfigError, match="different tokenizers") as err:
        Trainer(_config(data_sets, [{"config_path": str(data_sets["a"]), "weight": 1},
                                    {"config_path": str(data_sets["foreign"]), "weight": 1}]))
    assert "\n" not in str(err.value) and str(data_sets["root"] / "foreign" / "out") in str(err.value)


def test_a_blend_trains_and_validates_each_data_set_and_reports_its_mixture(
        data_sets: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(data_sets, [{"config_path": str(data_sets["a"]), "weight": 0.7},
                              {"config_path": str(data_sets["b"]), "weight": 0.3}], steps=4)
    trainer = Trainer(cfg)
    data = trainer.train_data.dataset
    sources = [data.locate(i)[0] for i in range(len(data))]
    assert len(sources) == 4 * cfg.trainer.train_batch_size and abs(sources.count(0) - 0.7 * len(sources)) <= 1
    caplog.set_level("INFO", logger="ironcore.train")
    final = trainer.train()
    # The mixture report: what the run drew from each data set, by the blend's own mapping.
    folder = Path(cfg.trainer.output_dir) / "mixture"
    report = json.loads((folder / "mixture.json").read_text())
    page = (folder / "mixture.html").read_text()
    assert [s["name"] for s in report["sources"]] == ["shakespeare-slice", "other"]
    for s, source in enumerate(report["sources"]):
        count = sources.count(s)
        assert source["samples"] == count and source["share"] == pytest.approx(count / len(sources), abs=1e-6)
        assert source["train_samples"] == len(data.sources[s])
        assert source["epochs"] == pytest.approx(count / len(data.sources[s]), abs=1e-4)
        assert source["tokens"] == count * trainer.seq_len and f"{source['name']}: run sample #" in page
    batch = cfg.trainer.train_batch_size
    assert report["first_batches"][1] == sources[batch : 2 * batch]
    assert sum(f"data mixture: shakespeare-slice {sources.count(0) / len(sources):.1%}" in r.message
               for r in caplog.records) == 1  # fmt: skip
    a, b = final["val_shakespeare-slice/loss"], final["val_other/loss"]
    assert final["val_loss"] == pytest.approx(0.7 * a + 0.3 * b) and a != b
    assert read_metrics(Path(cfg.trainer.output_dir))[0]["loss"] > 0
    assert {"val/loss", "val/other/loss", "val/shakespeare-slice/loss"} <= set(tracked_names(final))
    # `ironcore eval` of the run must be told which data set to evaluate on: one line naming the option
    with pytest.raises(ConfigError, match="trained on a data.blend .*; pass --data-config"):
        evaluate_checkpoint(cfg.trainer.output_dir)
