"""``mvar-dist verify-shards``: check every shard of one or more manifests (checksums, sample
counts, fields, code ranges); exit 1 if any shard is bad, 2 if there is no manifest to check."""

from __future__ import annotations

import argparse
from typing import Sequence

from mvar_dist.commands.reporting import FAILED, HelpFormatter, reports
from mvar_dist.data_prep.verify import verify_manifest
from mvar_dist.shards.manifest import find_manifests


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvar-dist verify-shards", formatter_class=HelpFormatter,
        description="Check every shard of one or more manifests: checksums, sample counts, fields and code ranges.",
        epilog="exit status: 0 every shard is good; 1 a bad shard was found (each is listed with its problem);\n"
               "2 a user error: no manifest at TARGET, or one that cannot be read.",
    )
    parser.add_argument("target", help="manifest.json, a split directory, or a prep --out directory (all splits)")
    return parser


@reports("verify-shards", FileNotFoundError, ValueError)
def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    results = [verify_manifest(path) for path in find_manifests(args.target)]
    for report in results:
        status = "OK" if report.ok else f"{len(report.bad_shards)} BAD"
        print(f"{report.manifest}: {report.shards_checked} shards, {report.samples_checked} samples: {status}")
        for name, problem in report.bad_shards.items():
            print(f"  bad shard {name}: {problem}")
    return 0 if all(r.ok for r in results) else FAILED
