"""train-ldm and sample under torchrun: 2 gloo processes on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bladdergen.checkpoint import load_training_state
from bladdergen.diffusion.sample import sample_volumes
from test_diffusion_fixtures import make_vqgan, micro_config, one_torch_thread  # noqa: F401

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, sys.argv[1])
    from test_diffusion_fixtures import micro_config

    from bladdergen.diffusion.sample import sample_volumes
    from bladdergen.diffusion.train import train_ldm
    from bladdergen.runtime import stop_runtime

    torch.set_num_threads(1)
    data, vqgan, root = (Path(a) for a in sys.argv[2:5])
    train_ldm(micro_config(**{"ldm.max_steps": 2}).ldm, data, root / "ldm", vqgan)
    sample_volumes(micro_config(), root / "ldm", root / "samples", 3)
    stop_runtime()
    """
)


def test_two_process_training_and_sampling_match_single_process_files(tiny_dataset, tmp_path):
    vqgan = make_vqgan(tmp_path / "vqgan", tiny_dataset)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(script), tests_dir]  # standalone: a free port each run
    command += [str(tiny_dataset), str(vqgan), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    assert load_training_state(tmp_path / "ldm" / "training_state.pt")["step"] == 2
    single = tmp_path / "single"
    sample_volumes(micro_config(), tmp_path / "ldm", single, 3)
    for i in range(3):
        name = f"images/sample_{i:05d}.nii.gz"
        assert (tmp_path / "samples" / name).read_bytes() == (single / name).read_bytes()
