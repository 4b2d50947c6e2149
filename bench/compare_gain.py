"""Paired differences between two ``bench_gain.py`` outputs that differ by one setting.

``bench_gain.py`` pairs every arm with ``supervised`` inside one output folder. A config change
(``--set deepatlas.seg_augment=true``, say) is measured as two outputs over the same data, seeds
and test cases; this script pairs one arm of ``--changed`` with the same arm of ``--reference``
per test case (averaged over seeds), with the same bootstrap CI, and prints the table::

    python bench/compare_gain.py --reference /tmp/noaug --changed /tmp/aug --arm supervised \\
        --labeled 4 --seeds 0 1 2

``--changed-arm`` pairs another arm of ``--changed`` with ``--arm`` of ``--reference`` (e.g.
``deepatlas+synthetic`` against ``deepatlas``: what the synthetic volumes add); the two outputs
may then be one folder. ``--changed-labeled N`` takes ``--changed``'s runs at N labeled cases
instead of ``--labeled`` (one count then): e.g. a supervised *oracle* that also has the labels of
the unlabeled pool against the supervised arm at 4 labeled cases, the most any use of those
scans could add::

    python bench/compare_gain.py --reference /tmp/g24 --changed /tmp/oracle --arm supervised \
        --labeled 4 --changed-labeled 16

Both outputs must score the same test cases (same ``--test-cases`` and data seed); the rows are
matched by case id and a case missing from either side is left out of the difference.

Each side may name several folders, whose runs are taken together: seeds trained in two
invocations (``--seeds 0 1 2`` into one folder, ``--seeds 3 4 5`` into another) are read as one
six-seed experiment::

    python bench/compare_gain.py --reference /tmp/B4 /tmp/B4b --arm supervised \
        --changed /tmp/S4n /tmp/B4b --changed-arm deepatlas+synthetic --labeled 4 --seeds 0 1 2 3 4 5

A run found in two folders of one side must hold the same rows in both (a baseline copied by
``--baselines`` does); two different results under one name stop the script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gain  # noqa: E402  (the sibling script: same summary and table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference", type=Path, nargs="+", required=True, help="bench_gain.py --out folder(s)"
    )
    parser.add_argument(
        "--changed", type=Path, nargs="+", required=True, help="bench_gain.py --out folder(s)"
    )
    parser.add_argument("--arm", default="supervised", choices=bench_gain.ARMS)
    parser.add_argument(
        "--changed-arm", choices=bench_gain.ARMS, help="the arm of --changed (default: --arm)"
    )
    parser.add_argument("--labeled", type=int, nargs="+", default=[4])
    parser.add_argument(
        "--changed-labeled",
        type=int,
        default=None,
        help="the labeled count of --changed's runs, paired with the one --labeled count",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--all-components", action="store_true")
    return parser.parse_args(argv)


def paired_runs(
    reference: dict,
    changed: dict,
    arm: str,
    changed_arm: str | None = None,
    labeled: tuple[int, int] | None = None,
) -> dict:
    """One results dict: ``reference``'s ``arm`` runs as ``supervised`` (the side differences are
    taken to), ``changed``'s ``changed_arm`` (default ``arm``) runs as ``deepatlas``, so
    :func:`bench_gain.summarise` pairs them. ``labeled`` (reference count, changed count): only
    those runs, ``changed``'s filed under the reference's count."""
    merged = {}
    sides = ((reference, arm, "supervised", 0), (changed, changed_arm or arm, "deepatlas", 1))
    for runs, wanted, side, which in sides:
        for key, rows in runs.items():
            n, seed, name = key.split("/")
            if labeled is not None:
                if int(n) != labeled[which]:
                    continue
                n = str(labeled[0])
            if name == wanted:
                merged[f"{n}/{seed}/{side}"] = rows
    return merged


def merged_runs(folders: list[Path], name: str = "gain") -> dict:
    """The runs of every folder's ``name``.json in one dict. ValueError (its message names the
    file) when one is missing, or when two folders hold different rows under one run name."""
    merged: dict = {}
    found_in: dict = {}
    for folder in folders:
        path = folder / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"{path}: not found (run bench_gain.py --out {folder} first)")
        for key, rows in json.loads(path.read_text())["runs"].items():
            if key in merged and merged[key] != rows:
                raise ValueError(
                    f"run {key} differs between {found_in[key]} and {path}: expected one result "
                    "per run name on each side"
                )
            merged[key], found_in[key] = rows, path
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = "gain_all_components" if args.all_components else "gain"
    runs = []
    for folders in (args.reference, args.changed):
        try:
            runs.append(merged_runs(folders, name))
        except ValueError as error:
            print(error, file=sys.stderr)
            return 2
    changed_arm = args.changed_arm or args.arm
    counts = None
    if args.changed_labeled is not None:
        if len(args.labeled) != 1:
            print("--changed-labeled pairs with one --labeled count", file=sys.stderr)
            return 2
        counts = (args.labeled[0], args.changed_labeled)
    merged = paired_runs(runs[0], runs[1], args.arm, changed_arm, counts)
    table = bench_gain.summarise(
        merged, ["supervised", "deepatlas"], args.labeled, args.seeds, args.bootstrap
    )
    at = f", {args.changed_labeled} labeled" if counts else ""
    reference, changed = (
        " + ".join(str(f) for f in side) for side in (args.reference, args.changed)
    )
    labels = {
        "supervised": f"{args.arm} ({reference})",
        "deepatlas": f"{changed_arm} ({changed}{at})",
    }
    for entry in table:
        entry["arm"] = labels[entry["arm"]]
    lines = bench_gain.table_lines(table)
    out = "\n".join(lines) + f"\n\nΔ = {changed_arm} of {changed} − {args.arm} of {reference}.\n"
    print(out)
    (args.changed[0] / f"compare_{name}.json").write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
