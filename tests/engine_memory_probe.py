"""One rank of a real DeepSpeed engine whose tensors tests/test_plan.py counts: run as a script
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (gloo, DS_ACCELERATOR=cpu).

It builds the trainer's engine (:func:`mvar_dist.training.optimizer.build_engine`) for an
experiment, runs one optimizer step of 2 micro-batches x the schedule's scale groups, and at
each point below records the bytes of every tensor storage that exists then and did not exist
before the model was built, each storage once, sorted into the engine's parameters (the
module's weights, ZeRO-3's partitions), fp32 master weights, Adam states and the rest
(gradients, DeepSpeed's buffers, a few scalars). ``gc`` finds tensors held by Python objects;
``.grad`` tensors live in C++ and are added by hand. Points: ``init`` (engine built),
``accumulating`` (after the first backward, not a boundary), ``boundary`` (after the step's last
backward), ``step`` (inside the optimizer step, after AdamW updated the first group),
``after_step``. Then it saves a DeepSpeed checkpoint and rank 0 lists the files' sizes.
Writes ``<out>/rank<r>.json``.

    python tests/engine_memory_probe.py CONFIG OUT_DIR [key=value overrides]
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _storages(extra: Iterable[Any]) -> dict[int, int]:
    found: dict[int, int] = {}
    for obj in [*gc.get_objects(), *extra]:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr():
                found[storage.data_ptr()] = max(found.get(storage.data_ptr(), 0), storage.nbytes())
    return found


def _pointers(tensors: Iterable[Any]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def main(config_path: str, out: str, overrides: list[str]) -> None:
    from mvar_dist.config import load_config
    from mvar_dist.model import MVAR
    from mvar_dist.training.optimizer import build_engine
    from mvar_dist.training.schedule import step_groups

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = load_config(config_path, overrides)
    split = config.train.batch_split(world)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[config.deepspeed.precision]
    torch.manual_seed(0)
    labels = torch.zeros(split.micro_batch, dtype=torch.long)
    layout = config.model.layout
    teacher = torch.randn(split.micro_batch, layout.num_tokens - layout.scale_len(0), config.model.z_channels).to(dtype)
    gc.collect()
    before = set(_storages(()))
    model = MVAR(config.model)
    engine = build_engine(model, config, world)
    optimizer, adamw = engine.optimizer, engine.optimizer.optimizer
    points: dict[str, dict[str, int]] = {}

    def record(point: str) -> None:
        gc.collect()
        params = list(engine.module.parameters())
        masters = [*getattr(optimizer, "single_partition_of_fp32_groups", []),
                   *getattr(optimizer, "fp32_partitioned_groups_flat", [])]
        grads = [t.grad for t in [*params, *masters, *(p for g in adamw.param_groups for p in g["params"])]]
        now = _storages(grads)
        kinds = {"parameters": _pointers([*params, *(getattr(p, "ds_tensor", None) for p in params)]),
                 "master_weights": _pointers(masters),
                 "adam_states": _pointers(t for state in adamw.state.values() for t in state.values())}
        tally = dict.fromkeys([*kinds, "other"], 0)
        for pointer, size in now.items():
            if pointer not in before:
                tally[next((k for k, ptrs in kinds.items() if pointer in ptrs), "other")] += size
        points[point] = tally

    step = adamw.step

    def step_and_record(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        if "step" not in points:  # the first group's update: its fp32 gradients still exist
            record("step")
        return result

    adamw.step = step_and_record
    record("init")
    groups = step_groups(config, 1)
    passes = split.accumulation * len(groups)
    for number in range(passes):
        engine.set_gradient_accumulation_boundary(number == passes - 1)
        logits = engine(labels, teacher, groups[number % len(groups)])
        engine.backward(logits.float().square().mean())
        del logits
        if number in (0, passes - 1):
            record("accumulating" if number == 0 else "boundary")
        engine.step()
    record("after_step")
    engine.save_checkpoint(str(Path(out) / "checkpoint"), tag="t")
    dist.barrier()
    result: dict[str, Any] = {"rank": rank, "points": points}
    if rank == 0:
        result["files"] = {p.name: p.stat().st_size for p in sorted((Path(out) / "checkpoint" / "t").iterdir())}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
