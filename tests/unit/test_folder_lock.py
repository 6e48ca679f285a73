"""The output-folder lock: one live job per folder, stale locks reported and taken over."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from stages.folder_lock import LOCK_NAME, FolderInUse, folder_lock
from tests.folder_locks import held_by_another_process, hold_in_child


def test_a_second_job_is_refused_naming_the_holder_and_the_lock_goes_when_released(tmp_path):
    out = tmp_path / "out"
    with folder_lock(out, "preprocess"):
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["job"] == "preprocess"
        refused = rf"{out} is in use by pid {os.getpid()} on .* \(preprocess"
        with pytest.raises(FolderInUse, match=refused), folder_lock(out, "render"):
            pass
    assert not (out / LOCK_NAME).exists()
    with folder_lock(out, "render"):  # free again
        pass


def test_another_process_is_refused_while_the_holder_lives(tmp_path):
    with held_by_another_process(tmp_path) as pid:
        refused = f"in use by pid {pid} on .* \\(holder, since"
        with pytest.raises(FolderInUse, match=refused), folder_lock(tmp_path, "second"):
            pass


def test_a_lock_left_by_a_killed_job_is_reported_and_taken_over(tmp_path, capsys):
    child = hold_in_child(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert (tmp_path / LOCK_NAME).exists()  # left behind, but nobody holds it
    with folder_lock(tmp_path, "next"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["job"] == "next"
    err = capsys.readouterr().err
    assert f"taking over a stale lock left by pid {child.pid}" in err and "(holder, since" in err


def test_a_file_is_refused_as_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file; expected a folder"), folder_lock(tmp_path / "f", "job"):
        pass


def test_contending_threads_never_hold_the_lock_together(tmp_path):
    """Acquire-release cycles from several threads (each its own open file, as separate jobs are): at
    most one is inside at any time, even as holders remove the lock file on release."""
    inside, most, taken = [0], [0], [0]
    guard = threading.Lock()
    deadline = time.monotonic() + 2.0

    def worker() -> None:
        while time.monotonic() < deadline:
            try:
                with folder_lock(tmp_path, "worker"):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                        taken[0] += 1
                    time.sleep(0.001)
                    with guard:
                        inside[0] -= 1
            except FolderInUse:
                pass

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and taken[0] > 10
