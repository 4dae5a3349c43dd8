"""A checkpoint write that fails because the disk is full says so; any other failure is left as it was."""

import errno

from sdpo_core import disk_space


def test_a_torch_write_error_on_a_nearly_full_disk_names_the_full_disk(tmp_path, free_bytes):
    free_bytes(2 * 2**20)
    message = disk_space.full_disk_message(tmp_path, RuntimeError("unexpected pos 64704 vs 64596"))
    assert message is not None
    assert f"writing a checkpoint under {tmp_path} failed: its disk is full (2.0 MiB free)" in message
    assert message.endswith("The write failed with: unexpected pos 64704 vs 64596")


def test_enospc_is_a_full_disk_whatever_the_free_space_says_now(tmp_path, free_bytes):
    free_bytes(5 * 2**30)  # e.g. a quota, or space freed since
    assert disk_space.full_disk_message(tmp_path, OSError(errno.ENOSPC, "No space left on device")) is not None


def test_other_failures_with_room_on_the_disk_are_not_explained(tmp_path, free_bytes):
    free_bytes(5 * 2**30)
    assert disk_space.full_disk_message(tmp_path, RuntimeError("unexpected pos 1 vs 2")) is None
    assert disk_space.full_disk_message(tmp_path, PermissionError(errno.EACCES, "Permission denied")) is None


def test_a_folder_not_created_yet_is_measured_on_its_nearest_existing_parent(tmp_path, monkeypatch, free_bytes):
    free_bytes(0)
    measured = disk_space.shutil.disk_usage
    asked = []
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: asked.append(path) or measured(path))
    assert disk_space.full_disk_message(tmp_path / "out" / "checkpoint-3", RuntimeError("x")) is not None
    assert asked == [str(tmp_path)]
