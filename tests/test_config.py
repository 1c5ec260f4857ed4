"""Experiment configs: loading, overrides, validation messages, the derived DeepSpeed JSON,
optimizer groups, lr schedule, scale schedules, and the schedule-all gradient identity."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mvar_dist.config import (
    ConfigError,
    compatibility_hash,
    config_from_dict,
    incompatible_keys,
    load_config,
    validate,
)
from mvar_dist.model import MVAR
from mvar_dist.training.losses import token_loss
from mvar_dist.training.optimizer import deepspeed_config, param_groups
from mvar_dist.training.schedule import lr_factor, step_groups

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = CONFIGS / "tiny_cpu.yaml"


def tiny(*overrides: str):
    return load_config(TINY, list(overrides))


def test_tiny_config_loads_with_overrides():
    config = tiny("train.total_steps=9", "optim.base_lr=2e-4", "model.patch_nums=[1,2,3,4]")
    assert config.train.total_steps == 9
    assert config.optim.base_lr == pytest.approx(2e-4)  # YAML reads 2e-4 as a string; still a float
    assert config.model.patch_nums == (1, 2, 3, 4)
    assert config.model.depth == 2 and config.model.embed_dim == 64


def configs_of(kind: str) -> list[Path]:
    from mvar_dist.config import load_experiment
    from mvar_dist.config.kinds import kind_of

    return [p for p in sorted(CONFIGS.glob("*.yaml")) if kind_of(load_experiment(p)).name == kind]


def experiment_configs() -> list[Path]:
    return configs_of("transformer")


def tokenizer_configs() -> list[Path]:
    return configs_of("tokenizer")


@pytest.mark.parametrize("path", tokenizer_configs(), ids=lambda p: p.stem)
def test_every_shipped_tokenizer_config_loads_and_validates(path, tmp_path):
    from mvar_dist.config import TOKENIZER, load_experiment, validate_experiment

    config = load_experiment(path, [f"data.train={tmp_path}"], TOKENIZER)
    world = 2 if "cpu" in path.stem else 8
    config.data.val = None if config.data.val is None else str(tmp_path)
    for name in ("vgg_weights", "lpips_weights"):  # weight files are not in the repository
        if getattr(config.loss, name):
            setattr(config.loss, name, str(path))
    validate_experiment(config, world)
    with pytest.raises(ConfigError, match="mvar-dist train-tokenizer"):
        load_config(path)  # the transformer's loader points to the right command


@pytest.mark.parametrize("path", experiment_configs(), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_its_batch_divides(path):
    config = load_config(path)
    world = 8 if path.stem.startswith(("mvar_", "var_")) else 2  # published recipes: 8 GPUs; CPU ones: 2 ranks
    config.train.init_from = None  # released weights are not in the repository
    config.tokenizer.checkpoint = None
    validate(config, world)
    assert config.to_dict()["model"]["depth"] == config.model.depth


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.totl_steps=5", "did you mean 'train.total_steps'"),
        ("trian.total_steps=5", "did you mean 'train'"),
        ("model.dpth=4", "did you mean 'model.depth'"),
        ("train.total_steps=abc", "train.total_steps must be an integer"),
        ("train.total_steps=2.5", "train.total_steps must be an integer"),
        ("optim.betas=[0.9]", "optim.betas must have 2 entries"),
        ("train.schedule=sometimes", "train.schedule must be one of ['paper', 'all']"),
        ("deepspeed.precision=fp8", "deepspeed.precision must be one of"),
        ("model.embed_dim=63", "embed_dim (63) must be divisible by num_heads"),
        ("data.num_workers=x", "data.num_workers must be an integer"),
    ],
)
def test_bad_keys_and_types_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        tiny(override)
    assert message in str(err.value)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        tiny("train.total_steps")


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["train.global_batch_size=10"], 2, "train.micro_batch_size=2 does not divide the 5 images each of 2 ranks"),
        (["train.global_batch_size=9"], 2, "train.global_batch_size=9 cannot be split over 2 ranks"),
        (["train.micro_batch_size=3"], 2, "train.micro_batch_size=3 does not divide the 4 images"),
        (["train.init_from=/nonexistent/var_d16.pth"], 2, "train.init_from: file /nonexistent/var_d16.pth does not exist"),
        (["tokenizer.checkpoint=/nonexistent/tok.pth"], 2, "tokenizer.checkpoint: file /nonexistent/tok.pth"),
        (["model.mode=var", "train.schedule=paper"], 2, "only mode='mvar'"),
        (["optim.warmup_steps=6"], 2, "optim.warmup_steps must be in 0..train.total_steps-1"),
    ],
)
def test_validate_names_the_field(overrides, world, message, tmp_path):
    config = tiny(*overrides)
    if not any(o.startswith("tokenizer.checkpoint") for o in overrides):
        config.tokenizer.checkpoint = None
    with pytest.raises(ConfigError) as err:
        validate(config, world)
    assert message in str(err.value)


def test_resume_compatibility_ignores_only_resumable_keys():
    base = tiny().to_dict()
    longer = tiny("train.total_steps=60", "checkpoint.every_steps=5", "run.dir=/elsewhere").to_dict()
    assert incompatible_keys(base, longer) == []
    assert compatibility_hash(base) == compatibility_hash(longer)
    changed = tiny("model.num_heads=4", "train.global_batch_size=16").to_dict()
    assert incompatible_keys(base, changed) == ["model.num_heads", "train.global_batch_size"]
    assert config_from_dict(base).to_dict() == base


def test_resume_may_change_the_bad_data_policy():
    """A run that stops on damaged shards may resume with data.bad_data / max_bad_fraction changed."""
    base = tiny().to_dict()
    relaxed = tiny("data.bad_data=fail", "data.max_bad_fraction=0.05").to_dict()
    assert incompatible_keys(base, relaxed) == []
    assert compatibility_hash(base) == compatibility_hash(relaxed)


def test_deepspeed_json_is_filled_from_the_experiment():
    config = tiny("deepspeed.template=zero3", "deepspeed.precision=bf16", "optim.grad_clip=1.5")
    ds = deepspeed_config(config, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert not any(k.startswith("_") for k in ds)
    fp32 = deepspeed_config(tiny("deepspeed.template=zero1"), world_size=1)
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"] and fp32["gradient_accumulation_steps"] == 4
    with pytest.raises(ConfigError, match="no template 'zero9'"):
        deepspeed_config(tiny("deepspeed.template=zero9"), world_size=1)


def test_lr_schedule_warmup_peak_and_final():
    config = tiny("train.total_steps=101", "optim.warmup_steps=10", "optim.lr=1.0")
    factors = [lr_factor(s, config) for s in range(101)]
    assert factors[0] == pytest.approx(0.005)
    assert factors[5] == pytest.approx(0.005 + 0.995 * 0.5)
    assert factors[10] == factors[11] == 1.0  # lin0 holds the peak briefly
    assert factors[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert config.peak_lr == 1.0
    assert tiny("optim.lr=null", "optim.base_lr=1e-4").peak_lr == pytest.approx(1e-4 * 8 / 256)


def test_param_groups_follow_the_released_recipe():
    model = MVAR(tiny().model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    free = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_start", "pos_1LC", "lvl_embed.weight", "head.bias", "word_embed.bias"} <= free
    assert any("scale_mul" in n for n in free)
    assert {"class_emb.weight", "head.weight", "word_embed.weight"} <= decayed
    assert any(n.endswith("mat_qkv.weight") for n in decayed)
    assert decayed.isdisjoint(free) and len(decayed | free) == len(names)


def test_paper_schedule_rotation():
    config = load_config(CONFIGS / "mvar_d16.yaml", ["train.schedule=paper"])
    groups = [step_groups(config, step) for step in range(1, 22)]
    low = [tuple(range(8))]
    assert groups[:8] == [low] * 8 and groups[8] == [(8,)] and groups[9] == [(9,)]
    assert groups[10:18] == [low] * 8 and groups[18] == [(8,)]
    assert step_groups(load_config(CONFIGS / "mvar_d16.yaml", ["train.schedule=all"]), 1) == [tuple(range(8)), (8,), (9,)]
    assert step_groups(load_config(CONFIGS / "var_d16.yaml"), 1) == [tuple(range(10))]


def test_schedule_all_groups_sum_to_the_full_loss_gradient():
    """Scale groups run separately (as schedule 'all' does) accumulate exactly the gradient of
    the full per-token loss of one pass over every scale: the Markov masks make the logits of a
    scale independent of the other scales."""
    config = tiny("model.cond_drop_rate=0.0", "model.drop_path_rate=0.0")
    torch.manual_seed(0)
    model = MVAR(config.model).double()
    layout = model.layout
    batch, length = 3, layout.num_tokens
    codes = torch.randint(0, config.model.vocab_size, (batch, length))
    labels = torch.randint(0, config.model.num_classes, (batch,))
    teacher = torch.randn(batch, length - 1, config.model.z_channels, dtype=torch.float64)

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return out

    all_scales = tuple(range(layout.num_scales))
    token_loss(model(labels, teacher, all_scales), model.targets_for(codes, all_scales), length, 0.1).backward()
    full = grads()
    groups = step_groups(config, 1)
    assert groups == [(0, 1), (2,), (3,)]
    for group in groups:
        token_loss(model(labels, teacher, group), model.targets_for(codes, group), length, 0.1).backward()
    grouped = grads()
    for a, b in zip(full, grouped):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # a wrong weighting (per-group mean instead of 1/L per token) would not match
    for group in groups:
        logits = model(labels, teacher, group)
        token_loss(logits, model.targets_for(codes, group), logits.shape[1], 0.1).backward()
    assert any(not torch.allclose(a, b) for a, b in zip(full, grads()))


def test_a_field_added_later_does_not_block_resuming_older_checkpoints():
    current = config_from_dict({}).to_dict()
    older = copy.deepcopy(current)
    del older["model"]["attn_l2_norm"], older["optim"]["final_lr_ratio"]  # as if written before they existed
    assert incompatible_keys(older, current) == []
    older["optim"]["warmup_start"] = 0.5
    assert incompatible_keys(older, current) == ["optim.warmup_start"]


# ----- experiment kinds: one loader, one place that decides -----


def test_the_kind_is_decided_in_one_place(tmp_path):
    from mvar_dist.config import (
        TOKENIZER,
        TRANSFORMER,
        ExperimentConfig,
        TokenizerExperiment,
        kind_named_by,
        kind_of,
        load_experiment,
    )

    assert isinstance(load_experiment(TINY), ExperimentConfig)
    assert kind_of(load_experiment(TINY)) is TRANSFORMER
    tokenizer = load_experiment(CONFIGS / "tokenizer_tiny_cpu.yaml")
    assert isinstance(tokenizer, TokenizerExperiment) and kind_of(tokenizer) is TOKENIZER
    assert kind_named_by({}) is TRANSFORMER and kind_named_by({"kind": "transformer"}) is TRANSFORMER
    # an explicit kind: transformer is allowed, and means what a file without it means
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("kind: transformer\n" + TINY.read_text())
    assert load_experiment(explicit) == load_experiment(TINY)
    with pytest.raises(ConfigError, match=r"kind must be one of \['tokenizer', 'transformer'\], got 'gan'"):
        load_experiment(TINY, ["kind=gan"])
    with pytest.raises(ConfigError, match="transformer experiment .*run it with mvar-dist train$"):
        load_experiment(TINY, expect=TOKENIZER)


def test_resume_conflicts_per_kind():
    from mvar_dist.config import (
        TOKENIZER_RESUMABLE_CHANGES,
        load_experiment,
        resume_conflicts,
    )
    from mvar_dist.config.kinds import TOKENIZER

    transformer = load_experiment(TINY)
    tokenizer = load_experiment(CONFIGS / "tokenizer_tiny_cpu.yaml")
    assert resume_conflicts(tokenizer.to_dict(), transformer) == ["kind"]
    assert resume_conflicts(transformer.to_dict(), tokenizer) == ["kind"]
    longer = load_experiment(CONFIGS / "tokenizer_tiny_cpu.yaml", ["train.total_steps=99", "optim.lr=0.5"])
    assert resume_conflicts(tokenizer.to_dict(), longer) == ["optim.lr"]  # total_steps may change
    assert "train.total_steps" in TOKENIZER.resumable_changes == TOKENIZER_RESUMABLE_CHANGES
