"""Run every benchmark from one entry point and write the results into docs/benchmarks.md.

Each benchmark script prints Markdown; this runner records, per benchmark, the exact command, its
wall time and its output, under a header naming the machine. The generated part of
docs/benchmarks.md sits between two marker lines; the hand-written analysis above them is kept.

    python bench/run_all.py                       # every benchmark (tens of minutes on 2 cores)
    python bench/run_all.py --only preprocess ldm # a subset
    python bench/run_all.py --demo-run runs/demo  # also report that demo run's stage times
    python bench/run_all.py --quick               # smaller settings, to check the runner itself
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = (
    "<!-- bench/run_all.py: generated below -->",
    "<!-- bench/run_all.py: generated above -->",
)

# name -> (full arguments, quick arguments) of bench/bench_<script>.py
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "preprocess": (
        "bench_preprocess.py",
        ["--cases", "24", "--size", "512", "--workers", "2"],
        ["--cases", "4", "--size", "128", "--workers", "2"],
    ),
    "vqgan": (
        "bench_vqgan.py",
        ["--profiles", "tiny", "paper", "--steps", "3", "--paper-steps", "1", "--threads", "2"],
        ["--profiles", "tiny", "--steps", "1", "--threads", "2"],
    ),
    "ldm-speed": ("bench_ldm.py", ["speed", "--volumes", "4"], ["speed", "--volumes", "1"]),
    "ldm-train": ("bench_ldm.py", ["train", "--profile", "paper"], ["train", "--profile", "tiny"]),
    "deepatlas-cycle": (
        "bench_deepatlas.py",
        ["cycle", "--profile", "tiny", "--size", "64", "64", "24", "--cycles", "2"],
        ["cycle", "--profile", "tiny", "--size", "32", "32", "8", "--cycles", "1"],
    ),
    "deepatlas-paper": (
        "bench_deepatlas.py",
        ["paper-memory", "--sizes", "128", "256"],
        ["paper-memory", "--sizes", "64"],
    ),
    "evaluate": ("bench_evaluate.py", ["--threads", "1", "--repeats", "3"], ["--repeats", "1"]),
}


def machine_description() -> str:
    """CPU model, cores, memory, GPU and library versions, as one Markdown paragraph.

    The CPU capability (AVX2, AVX512) is PyTorch's kernel choice: the same training took twice
    as long on an AVX2 host as on an earlier, unrecorded one, and reached different weights
    (docs/benchmarks.md, Demo)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{memory}, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()})"
        f"{load}."
    )


def run_benchmark(name: str, quick: bool) -> str:
    script, full, small = BENCHMARKS[name]
    args = small if quick else full
    command = [sys.executable, str(ROOT / "bench" / script), *args]
    shown = " ".join(["python", f"bench/{script}", *args])
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    body = completed.stdout.strip() or "(no output)"
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-15:])
        body += f"\n\nFAILED with exit code {completed.returncode}:\n\n```\n{tail}\n```"
    return f"### {name}\n\n`{shown}` ({seconds:.0f} s)\n\n{body}\n"


def demo_section(run_dir: Path) -> str:
    summary = json.loads((run_dir / "demo.json").read_text())
    rows = "\n".join(f"| {stage} | {secs} |" for stage, secs in summary["seconds"].items())
    return (
        f"### demo\n\nStage times of the demo run in `{run_dir}` "
        f"(0 = skipped because already done):\n\n| stage | seconds |\n|---|---|\n{rows}\n"
        f"| **total** | **{summary['total_seconds']}** |\n"
    )


def write_section(path: Path, generated: str) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = text.rstrip() + "\n\n", "\n"
    new = f"{head}{START}\n\n{generated}\n{END}{tail}"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="small settings (checks the runner)")
    parser.add_argument("--demo-run", type=Path, help="a finished `bladdergen demo` run folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [
        "## All benchmarks, one run",
        "",
        f"`python bench/run_all.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        f"on {started}. Machine: {machine_description()}",
        "",
    ]
    for name in args.only:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        parts.append(run_benchmark(name, args.quick))
    if args.demo_run is not None:
        parts.append(demo_section(args.demo_run))
    write_section(args.out, "\n".join(parts))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
