"""``mvar-dist verify-shards``: check every shard of one or more manifests (checksums, sample
counts, fields, code ranges); exit 1 if any shard is bad."""

from __future__ import annotations

import argparse
from typing import Sequence

from mvar_dist.commands.reporting import reports
from mvar_dist.data_prep.verify import verify_manifest
from mvar_dist.shards.manifest import find_manifests


@reports("verify-shards", FileNotFoundError, ValueError, code=2)
def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mvar-dist verify-shards", description=__doc__.split("\n")[0])
    parser.add_argument("target", help="manifest.json, a split directory, or a prep --out directory (all splits)")
    args = parser.parse_args(list(argv))
    reports = [verify_manifest(path) for path in find_manifests(args.target)]
    for report in reports:
        status = "OK" if report.ok else f"{len(report.bad_shards)} BAD"
        print(f"{report.manifest}: {report.shards_checked} shards, {report.samples_checked} samples: {status}")
        for name, problem in report.bad_shards.items():
            print(f"  bad shard {name}: {problem}")
    return 0 if all(r.ok for r in reports) else 1
