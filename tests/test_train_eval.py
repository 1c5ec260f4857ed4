"""Periodic validation and sample grids during training (mvar_dist.evaluation + the trainer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, TINY_TOKENIZER, write_tiny_images
from test_train import TINY, metric_history, model_states, ok, run_train

from mvar_dist.config import ConfigError, load_config, validate
from mvar_dist.scales import ScaleLayout
from mvar_dist.training.evaluation import masked_scale_sums, sample_grid, val_metrics
from mvar_dist.training.losses import ScaleStats

VAL_CLASSES, VAL_PER_CLASS = 3, 3  # 9 samples: 2 ranks get 5 and 4, so the last batches are padded


@pytest.fixture(scope="module")
def val_manifest(tiny_codes, tmp_path_factory) -> Path:
    """A validation split made with the tiny_codes tokenizer (same helpers as tests/conftest.py)."""
    from mvar_dist.data_prep import sources
    from mvar_dist.data_prep.merge import merge_manifest
    from mvar_dist.data_prep.shard import shard_dataset
    from mvar_dist.tokenizer import MultiScaleVQVAE

    base = tmp_path_factory.mktemp("tiny_val")
    tokenizer = MultiScaleVQVAE(**TINY_TOKENIZER)
    tokenizer.load_state_dict(torch.load(tiny_codes.tokenizer, weights_only=True))
    write_tiny_images(base / "images", VAL_CLASSES, VAL_PER_CLASS, seed=1)
    # the train split's class list, as `mvar-dist prep --classes-from` gives it: labels must match
    source = sources.list_class_folder(base / "images", classes=tuple(f"class{c}" for c in range(TINY_CLASSES)))
    shard_dataset(source, base / "out", tokenizer, name="tiny", split="val", shard_size=4, batch_size=64, progress=False)
    return Path(merge_manifest(base / "out", "val"))


# ----- masked reduction (fast) -----


def test_masked_sums_ignore_padded_rows_and_add_up_over_ranks():
    layout = ScaleLayout((1, 2, 3))
    torch.manual_seed(0)
    logits, targets = torch.randn(6, layout.num_tokens, 5), torch.randint(0, 5, (6, layout.num_tokens))
    mask = torch.tensor([True, True, False, True, True, False])
    logits[~mask] = float("nan")  # padding may hold anything; it must not leak into the sums
    # two "ranks" holding 3 rows each, summed as the all-reduce does
    sums = masked_scale_sums(layout, logits[:3], targets[:3], mask[:3]) + masked_scale_sums(
        layout, logits[3:], targets[3:], mask[3:]
    )
    expected = ScaleStats(layout.num_scales)
    expected.add(layout, (0, 1, 2), logits[mask], targets[mask])
    torch.testing.assert_close(sums, expected.sums)
    metrics = val_metrics(sums)
    ce = torch.nn.functional.cross_entropy(logits[mask].transpose(1, 2), targets[mask], reduction="none")
    assert metrics["val/loss"] == pytest.approx(ce.mean().item())
    assert metrics["val/loss/scale_2"] == pytest.approx(ce[:, 5:].mean().item())
    assert metrics["val/acc"] == pytest.approx(100 * (logits[mask].argmax(-1) == targets[mask]).float().mean().item())
    assert metrics["val/samples"] == 4 and "val/acc/scale_0" in metrics
    assert val_metrics(torch.zeros(3, 3, dtype=torch.float64)) == {}  # nothing valid: nothing logged


def test_eval_settings_are_validated_naming_the_field(tiny_codes, tmp_path):
    base = tiny_codes.overrides(tmp_path)
    with pytest.raises(ConfigError, match="train.val_every_steps=2 needs data.val_manifest"):
        validate(load_config(TINY, base + ["train.val_every_steps=2"]), 2)
    with pytest.raises(ConfigError, match="sample.classes"):
        validate(load_config(TINY, base + ["sample.every_steps=1", "sample.classes=[0, 9]"]), 2)
    with pytest.raises(ConfigError, match="sample.every_steps must be >= 0"):
        validate(load_config(TINY, base + ["sample.every_steps=-1"]), 2)
    config = load_config(TINY, base + ["sample.every_steps=1"])
    validate(config, 2)
    assert config.sample.grid_classes(config.model.num_classes) == (0, 1, 2, 3)


def test_sample_grid_is_fixed_by_its_seed_and_leaves_global_rng_alone(tiny_codes, tmp_path):
    from mvar_dist.model import MVAR
    from mvar_dist.tokenizer import MultiScaleVQVAE

    config = load_config(TINY, tiny_codes.overrides(tmp_path) + ["sample.classes=[1, 3, 4]", "sample.per_class=2"])
    torch.manual_seed(0)
    model = MVAR(config.model).train()
    tokenizer = MultiScaleVQVAE.from_checkpoint(tiny_codes.tokenizer, **config.tokenizer.options)
    state = torch.get_rng_state()
    grid = sample_grid(model, tokenizer, config, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state) and model.training
    torch.manual_seed(123)  # a different global state must not change the grid
    assert np.array_equal(sample_grid(model, tokenizer, config, torch.device("cpu")), grid)
    size = 4  # tiny tokenizer: 4 px images; 3 rows x 2 columns with 2 px padding
    assert grid.dtype == np.uint8 and grid.shape == (3 * (size + 2) + 2, 2 * (size + 2) + 2, 3)


# ----- end to end (slow) -----


def single_process_val_loss(tiny_codes, config_overrides: list[str], weights: dict) -> dict[str, float]:
    """The validation metrics recomputed with plain torch on one process from saved weights."""
    from mvar_dist.data import build_val_loader
    from mvar_dist.model import MVAR
    from mvar_dist.tokenizer import MultiScaleVQVAE

    config = load_config(TINY, config_overrides)
    model = MVAR(config.model)
    model.load_state_dict(weights)
    model.eval()
    tokenizer = MultiScaleVQVAE.from_checkpoint(tiny_codes.tokenizer, **config.tokenizer.options)
    layout, scales = model.layout, tuple(range(model.layout.num_scales))
    sums = torch.zeros(layout.num_scales, 3, dtype=torch.float64)
    with torch.no_grad():
        for codes, labels, mask in build_val_loader(config.data, rank=0, world_size=1, batch_size=16):
            logits = model(labels, tokenizer.codes_to_teacher_input(codes), scales)
            sums += masked_scale_sums(layout, logits, model.targets_for(codes, scales), mask)
    assert sums[0, 2] == VAL_CLASSES * VAL_PER_CLASS  # every validation sample exactly once
    return val_metrics(sums)


def grid_images(run_dir: Path, dst: Path) -> dict[str, np.ndarray]:
    from mlflow import MlflowClient
    from PIL import Image

    from mvar_dist.tracking import read_run_record

    record = read_run_record(run_dir)
    client = MlflowClient(tracking_uri=record.tracking_uri)
    local = Path(client.download_artifacts(record.run_id, "samples", str(dst)))
    return {p.name: np.asarray(Image.open(p)) for p in sorted(local.glob("*.png"))}


@pytest.mark.slow
def test_validation_and_grids_keep_resume_exact(tiny_codes, val_manifest, tmp_path):
    steps = ["train.total_steps=5", "checkpoint.every_steps=2", f"data.val_manifest={val_manifest}",
             "train.val_every_steps=2", "sample.every_steps=2", "sample.per_class=2"]
    ok(run_train(tiny_codes, tmp_path / "whole", *steps))
    killed = run_train(tiny_codes, tmp_path / "resumed", *steps, "debug.kill_after_checkpoint_step=2")
    assert killed.returncode != 0
    ok(run_train(tiny_codes, tmp_path / "resumed", *steps))

    whole, resumed = model_states(tmp_path / "whole", 5)["module"], model_states(tmp_path / "resumed", 5)["module"]
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) <= 1e-6
    for key in ("train/loss", "val/loss", "val/acc/scale_3"):
        expected, got = metric_history(tmp_path / "whole", key), metric_history(tmp_path / "resumed", key)
        assert [s for s, _ in got] == [s for s, _ in expected]
        torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]))
    val = metric_history(tmp_path / "whole", "val/loss")
    assert [s for s, _ in val] == [2, 4, 5]  # every val_every_steps and at the end
    assert [v for _, v in metric_history(tmp_path / "whole", "train/images_seen")] == [8, 16, 24, 32, 40]

    # the 2-rank value (padded batches, all-reduced) equals a one-process pass on the same weights
    overrides = tiny_codes.overrides(tmp_path / "unused") + [f"data.val_manifest={val_manifest}"]
    for step in (4, 5):
        expected = single_process_val_loss(tiny_codes, overrides, model_states(tmp_path / "whole", step)["module"])
        got = {k: dict(metric_history(tmp_path / "whole", k))[step] for k in expected}
        assert got == pytest.approx(expected, rel=1e-5)

    size = 4  # 4 classes (the default rows) x sample.per_class=2 of 4 px images, 2 px padding
    for run in ("whole", "resumed"):
        grids = grid_images(tmp_path / run, tmp_path / f"{run}_artifacts")
        assert sorted(grids) == ["step_0000002.png", "step_0000004.png", "step_0000005.png"]
        assert all(g.shape == (4 * (size + 2) + 2, 2 * (size + 2) + 2, 3) for g in grids.values())
    # fixed seed and identical weights: the resumed run drew the same pictures
    whole_grids = grid_images(tmp_path / "whole", tmp_path / "whole_again")
    assert np.array_equal(whole_grids["step_0000005.png"], grids["step_0000005.png"])


@pytest.mark.slow
def test_zero3_validates_on_every_rank_and_skips_grids(tiny_codes, val_manifest, tmp_path):
    run_dir = tmp_path / "zero3"
    result = run_train(tiny_codes, run_dir, "deepspeed.template=zero3", "train.total_steps=2",
                       f"data.val_manifest={val_manifest}", "train.val_every_steps=1", "sample.every_steps=1")
    ok(result)
    val = metric_history(run_dir, "val/loss")
    assert [s for s, _ in val] == [1, 2] and all(np.isfinite(v) for _, v in val)
    assert "no sample grid under ZeRO-3" in result.stderr
