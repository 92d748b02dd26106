"""Unit tests for u2seg.bench.scale's CPU accounting: a child's CPU counts, other processes' do not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from u2seg.bench.scale import TreeCpu

pytestmark = pytest.mark.unit

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}:\n    pass\n"


def test_tree_cpu_counts_a_child_that_exited_and_never_decreases() -> None:
    cpu = TreeCpu(interval_s=0.05)
    try:
        before = cpu.seconds()
        subprocess.run([sys.executable, "-c", BURN.format(s=0.6)], check=True)
        after = cpu.seconds()
        time.sleep(0.1)  # the child is gone: its last sample stays counted
        later = cpu.seconds()
    finally:
        cpu.close()
    assert 0.3 <= after - before < 5.0
    assert later >= after


def test_tree_cpu_ignores_a_process_outside_its_tree(tmp_path: Path) -> None:
    # a shell starts the burner in the background and exits: the burner is re-parented away from us
    script, done = tmp_path / "burn.py", tmp_path / "done"
    script.write_text(BURN.format(s=0.8) + f"open({str(done)!r}, 'w').close()\n")
    sh = subprocess.run(["sh", "-c", f"{sys.executable} {script} >/dev/null 2>&1 & echo $!"],
                        check=True, capture_output=True, text=True)
    burner = int(sh.stdout.strip())
    cpu = TreeCpu(interval_s=0.05)
    try:
        # this whole process's CPU (every thread: a long pytest session keeps threads of earlier tests busy)
        before, own = cpu.seconds(), time.process_time()
        deadline = time.time() + 30
        while os.path.exists(f"/proc/{burner}") and time.time() < deadline:
            time.sleep(0.05)
        after, own = cpu.seconds(), time.process_time() - own
    finally:
        cpu.close()
    assert done.exists()  # the burner really ran its 0.8 s
    assert after - before - own < 0.2  # only this process's own CPU counted, not the burner's 0.8 s
