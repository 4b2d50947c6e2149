"""The run engine under the three trainers, seen from the command line: refusing a resume with
nothing to resume or a changed setting, exact resume after ``kill -9``, progress lines in a log
file, and the training-curve picture."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from bladdergen.checkpoint import load_training_state
from test_diffusion_fixtures import MICRO, make_vqgan

# Tiny settings per trainer: 24 steps, checkpoints every 8, so a kill can land between two.
SETTINGS = {
    "vqgan": {
        "n_hiddens": 4,
        "n_codes": 32,
        "num_groups": 4,
        "disc_channels": 4,
        "disc_layers": 2,
        "disc_start": 4,
        "max_steps": 24,
        "checkpoint_every": 8,
        "log_every": 1,
        "image_every": 100,
        "device": "cpu",
    },
    "ldm": {
        **{k.split(".", 1)[1]: v for k, v in MICRO.items() if k.startswith("ldm.")},
        "max_steps": 24,
        "checkpoint_every": 8,
    },
    "deepatlas": {
        "seg_filters": [4, 8, 8],
        "reg_filters": [4, 8, 8],
        "reg_pretrain_steps": 4,
        "seg_pretrain_steps": 4,
        "reg_steps_per_cycle": 2,
        "seg_steps_per_cycle": 2,
        "val_every": 8,
        "max_steps": 24,
        "checkpoint_every": 8,
        "log_every": 1,
        "device": "cpu",
    },
}
VQGAN_FOR_LDM = {k.split(".", 1)[1]: v for k, v in MICRO.items() if k.startswith("vqgan.")}
# A setting that changes what is learned, per trainer: (key, new value).
NOT_RESUMABLE = {"vqgan": ("lr", 0.5), "ldm": ("learning_rate", 0.5), "deepatlas": ("seg_lr", 0.5)}
COMMANDS = {"vqgan": "train-vqgan", "ldm": "train-ldm", "deepatlas": "train-deepatlas"}


@pytest.fixture(scope="module")
def inputs(tiny_dataset, tmp_path_factory):
    """Config files per trainer, and the frozen VQ-GAN the LDM needs."""
    root = tmp_path_factory.mktemp("engine")
    configs = {}
    for kind, settings in SETTINGS.items():
        mapping = {"profile": "tiny", kind: settings}
        if kind == "ldm":
            mapping["vqgan"] = VQGAN_FOR_LDM
        configs[kind] = root / f"{kind}.yaml"
        configs[kind].write_text(yaml.safe_dump(mapping))
    return {
        "data": tiny_dataset,
        "configs": configs,
        "vqgan": make_vqgan(root / "vq", tiny_dataset),
    }


def _command(kind, inputs, run_dir, *extra):
    args = [sys.executable, "-m", "bladdergen", COMMANDS[kind], str(inputs["data"]), str(run_dir)]
    args += ["--config", str(inputs["configs"][kind]), *extra]
    if kind == "ldm":
        args += ["--vqgan", str(inputs["vqgan"])]
    return args


def _env():
    # one thread in every process, so the runs being compared do the same float arithmetic
    return {**os.environ, "OMP_NUM_THREADS": "1", "BLADDERGEN_DEBUG": ""}


def _run(kind, inputs, run_dir, *extra, stderr_path=None):
    with open(stderr_path or os.devnull, "w") as stderr:
        return subprocess.run(
            _command(kind, inputs, run_dir, *extra),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_env(),
            timeout=300,
        )


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """One uninterrupted run per trainer, stderr sent to a file as under SLURM or nohup."""
    runs = {}
    for kind in SETTINGS:
        run_dir = tmp_path_factory.mktemp(f"straight_{kind}") / "run"
        log = run_dir.parent / "stderr.log"
        assert _run(kind, inputs, run_dir, stderr_path=log).returncode == 0, log.read_text()
        runs[kind] = (run_dir, log)
    return runs


def _fail(kind, inputs, run_dir, *extra):
    completed = subprocess.run(
        _command(kind, inputs, run_dir, *extra),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    return completed.returncode, completed.stderr


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_resume_with_nothing_to_resume_exits_2_and_writes_nothing(kind, inputs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, stderr = _fail(kind, inputs, empty, "--resume")
    assert code == 2 and "nothing to resume" in stderr and "Traceback" not in stderr
    assert list(empty.iterdir()) == []
    code, stderr = _fail(kind, inputs, tmp_path / "missing", "--resume")
    assert code == 2 and "nothing to resume" in stderr
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_resume_with_a_changed_setting_exits_2_naming_the_key_and_old_and_new_value(
    kind, inputs, uninterrupted
):
    run_dir, _ = uninterrupted[kind]
    key, value = NOT_RESUMABLE[kind]
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())[kind][key]
    before = (run_dir / "config.yaml").read_bytes()
    changed = inputs["configs"][kind].parent / f"{kind}_changed.yaml"
    mapping = yaml.safe_load(inputs["configs"][kind].read_text())
    mapping[kind][key] = value
    changed.write_text(yaml.safe_dump(mapping))
    args = _command(kind, inputs, run_dir, "--resume")
    args[args.index(str(inputs["configs"][kind]))] = str(changed)
    completed = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=300)
    assert completed.returncode == 2
    assert f"{kind}.{key} is {value!r} but the run used {recorded!r}" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert (run_dir / "config.yaml").read_bytes() == before


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_kill_9_between_checkpoints_then_resume_gives_bit_identical_weights(
    kind, inputs, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            _command(kind, inputs, run_dir), stdout=subprocess.DEVNULL, stderr=stderr, env=_env()
        )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if len(lines) >= 10:  # past the checkpoint at step 8, before the one at 16
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"not killed mid-run: {log.read_text()[-2000:]}"
    assert load_training_state(run_dir / "training_state.pt")["step"] < 24

    assert _run(kind, inputs, run_dir, "--resume").returncode == 0
    straight, _ = uninterrupted[kind]
    resumed = load_file(run_dir / "model.safetensors")
    reference = load_file(straight / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert resumed[name].equal(tensor), name
    steps = [
        line
        for line in metrics.read_text().splitlines()
        if '"phase": "validation"' not in line and '"phase": "synthetic_filter"' not in line
    ]
    assert len(steps) == 24  # every step logged once, none twice


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_a_run_with_stderr_to_a_file_prints_several_progress_lines_before_it_ends(
    kind, uninterrupted
):
    _, log = uninterrupted[kind]
    lines = [line for line in log.read_text().splitlines() if "/24 (" in line]
    assert len(lines) >= 5
    assert "elapsed" in lines[0] and "eta" in lines[0]
    assert lines[-1].split(": ", 1)[1].startswith("24/24 (100%)")


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_every_run_folder_gets_a_training_curve_picture(kind, uninterrupted):
    run_dir, _ = uninterrupted[kind]
    picture = run_dir / "curves.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_a_run_folder_that_is_a_file_or_holds_unrelated_files_exits_2_untouched(
    kind, inputs, tmp_path
):
    as_file = tmp_path / "run.txt"
    as_file.write_text("notes")
    code, stderr = _fail(kind, inputs, as_file)
    assert code == 2 and str(as_file) in stderr and "is a file" in stderr
    assert "Traceback" not in stderr and as_file.read_text() == "notes"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.docx").write_text("draft")
    code, stderr = _fail(kind, inputs, busy)
    assert code == 2 and "thesis.docx" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.docx"]


def test_a_loss_that_becomes_non_finite_exits_2_and_keeps_the_last_good_checkpoint(
    inputs, tmp_path
):
    diverging = inputs["configs"]["ldm"].parent / "ldm_diverging.yaml"
    mapping = yaml.safe_load(inputs["configs"]["ldm"].read_text())
    mapping["ldm"] |= {"learning_rate": 1e30, "checkpoint_every": 1, "max_steps": 24}
    diverging.write_text(yaml.safe_dump(mapping))
    args = _command("ldm", inputs, tmp_path / "run")
    args[args.index(str(inputs["configs"]["ldm"]))] = str(diverging)
    completed = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=300)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "training became non-finite at step" in completed.stderr
    failed_at = int(completed.stderr.split("non-finite at step ")[1].split(" ")[0])
    state = load_training_state(tmp_path / "run" / "training_state.pt")
    assert state["step"] == failed_at - 1  # the checkpoint before the bad step stays
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert all(bool(t.isfinite().all()) for t in weights.values())
