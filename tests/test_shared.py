"""The lock the receiving processes share: let go of by the kernel when its holder dies."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from dicomnode.shared import ProcessLock


def test_a_receiver_killed_holding_the_lock_does_not_stop_the_others(tmp_path: Path) -> None:
    path = tmp_path / "held.lock"
    # Given a receiving process killed (SIGKILL) while it holds the lock
    holder = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from dicomnode.shared import ProcessLock\n"
        "lock = ProcessLock(Path(sys.argv[1]))\n"
        "lock.__enter__()\n"
        "print('held', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", holder, str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.stdout == "held\n" and run.returncode == -9
    # Then the others take it at once
    lock = ProcessLock(path)
    started = time.monotonic()
    with lock:
        pass
    assert time.monotonic() - started < 1.0
    lock.close()


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    # flock belongs to the open file, which the threads share: the lock must still keep
    # two of them apart
    lock = ProcessLock(tmp_path / "held.lock")
    inside, most = 0, 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(200):
            with lock:
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
    lock.close()
