"""``mvar-dist plan``'s prediction against CUDA's allocator: configs/mvar_d16.yaml (MVAR d16,
the paper rotation) at micro batch 32, bf16, ZeRO-2, on one GPU, through the trainer's own
engine and ``mvar_dist.training.task.train_step``.

The plan's figures are ``torch.cuda.max_memory_allocated`` figures: what tensors hold, not the
CUDA context, NCCL's buffers or the allocator's cached free blocks (``max_memory_reserved``, also
printed, shows those). One rotation (8 steps of scales 0..7, one of scale 8, one of 9) runs
after a warm-up step; for each step the allocator's peak is compared with the plan's prediction
for that step's scale group, and the largest with the plan's peak. The tokenizer is the released
VQVAE architecture with random weights (its memory is what the run's is); codes are random.

    python benchmarks/plan_check.py [--batch 32] [--json plan_check.json]
    python benchmarks/plan_check.py --smoke      # CPU, depth 2: runs the code path, measures nothing

Exit status 0 with a CUDA device (whatever the comparison shows; read it), 1 without one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "mvar_d16.yaml"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--template", default="zero2")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--json", help="also write the comparison to this file")
    parser.add_argument("--smoke", action="store_true", help="on CPU at depth 2 (gloo): the code path only")
    args = parser.parse_args()

    import torch

    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        print("plan_check: no CUDA device", file=sys.stderr)
        return 1
    import deepspeed

    from mvar_dist.config import load_config
    from mvar_dist.memory.plan import Cluster, PassCounter, plan_run
    from mvar_dist.model import MVAR
    from mvar_dist.runtime.distributed import free_port
    from mvar_dist.tokenizer import MultiScaleVQVAE
    from mvar_dist.training.losses import ScaleStats
    from mvar_dist.training.optimizer import build_engine
    from mvar_dist.training.schedule import step_groups
    from mvar_dist.training.task import train_step

    overrides = [f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
                 f"deepspeed.template={args.template}", f"deepspeed.precision={args.precision}"]
    if args.smoke:
        overrides += ["model.depth=2", "model.attention_backend=torch"]
    config = load_config(args.config, overrides)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 2**40

    def allocated() -> int:
        return torch.cuda.memory_allocated(device) if cuda else 0

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    # the prediction: one rank, no reserve (the comparison is with what tensors hold)
    plan = plan_run(config, Cluster(1, 1, total, 0, float(2**30)), args.config)
    stage = next(s for s in plan.stages if s.configured)
    counter = PassCounter(config.model, args.precision, config.train.recompute_every)

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", init_method="env://")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = MVAR(config.model)
    model.set_activation_checkpointing(config.train.recompute_every)
    engine = build_engine(model, config, world_size=1)
    tokenizer = MultiScaleVQVAE(**config.tokenizer.options).to(device).eval()
    synchronize()
    after_init = allocated()
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            codes = torch.randint(0, config.model.vocab_size, (args.batch, model.layout.num_tokens), generator=generator)
            yield codes, torch.randint(0, config.model.num_classes, (args.batch,), generator=generator), torch.arange(args.batch)

    stream = batches()
    steps = []
    period = config.train.ratio_k + model.layout.num_scales - config.model.refine_step
    for step in range(1, period + 2):  # step 1 warms up (Adam's states appear in its update)
        groups = step_groups(config, step)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        train_step(engine, model, tokenizer, stream, 1, groups, ScaleStats(model.layout.num_scales, device), 0.0, device)
        synchronize()
        predicted = max(stage.peak_at(counter.count(tuple(g), args.batch)) for g in groups)
        steps.append({"step": step, "groups": [list(g) for g in groups], "predicted": predicted,
                      "measured": torch.cuda.max_memory_allocated(device) if cuda else 0,
                      "reserved": torch.cuda.max_memory_reserved(device) if cuda else 0, "between_steps": allocated()})
    timed = steps[1:]
    worst = max(timed, key=lambda s: s["measured"])
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (smoke run: nothing measured)",
        "config": args.config, "depth": config.model.depth, "batch": args.batch, "template": args.template, "precision": args.precision, "attention_backend": plan.attention_backend,
        "after_init": after_init, "predicted_after_init": stage.state.parameters + stage.state.master_weights + stage.fixed,
        "between_steps": timed[-1]["between_steps"],
        "predicted_between_steps": stage.state.between_steps + stage.fixed,
        "measured_peak": worst["measured"], "reserved_peak": max(s["reserved"] for s in timed),
        "predicted_peak": stage.peak_at(counter.largest(args.batch)), "steps": steps,
    }
    result["measured_over_predicted"] = result["measured_peak"] / result["predicted_peak"]
    deepspeed.comm.destroy_process_group()
    print(f"plan check on {result['device']}: d{config.model.depth} batch {args.batch} {args.precision} "
          f"{args.template}, {plan.attention_backend} attention")
    print(f"{'':24} {'predicted MiB':>14} {'measured MiB':>14} {'measured/pred':>14}")
    for name, predicted, measured in (("after engine init", result["predicted_after_init"], after_init),
                                      ("between steps", result["predicted_between_steps"], result["between_steps"]),
                                      ("peak of a step", result["predicted_peak"], result["measured_peak"])):
        print(f"{name:24} {predicted / MIB:14.0f} {measured / MIB:14.0f} {measured / max(predicted, 1):14.3f}")
    for s in timed:
        print(f"  step {s['step']:2d} scales {','.join(str(x) for g in s['groups'] for x in g):16} "
              f"predicted {s['predicted'] / MIB:8.0f}  measured {s['measured'] / MIB:8.0f}  reserved {s['reserved'] / MIB:8.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
