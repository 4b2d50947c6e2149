"""Atomic writes and file hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bladdergen.fileio import atomic_path, atomic_write_text, sha256_file


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_temporary_keeps_the_final_suffixes(tmp_path: Path):
    with atomic_path(tmp_path / "vol.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")


def test_sha256_of_a_folder_hashes_its_files_in_name_order(tmp_path: Path):
    (tmp_path / "b").write_bytes(b"second")
    (tmp_path / "a").write_bytes(b"first")
    assert sha256_file(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()


def test_atomic_output_gets_the_permissions_of_a_plain_write(tmp_path: Path):
    import os

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    mode = os.stat(tmp_path / "atomic.txt").st_mode & 0o777
    assert mode == os.stat(plain).st_mode & 0o777


def test_truncating_a_log_keeps_steps_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path: Path):
    from bladdergen.fileio import truncate_jsonl_after_step

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    truncate_jsonl_after_step(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
