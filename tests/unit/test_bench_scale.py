"""Unit tests for u2seg.bench.scale's CPU accounting: a child's CPU counts, other processes' do not."""

from __future__ import annotations

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


PROBE = """
import json, os, subprocess, sys, time
from u2seg.bench.scale import TreeCpu
script, done = sys.argv[1], sys.argv[2]
sh = subprocess.run(["sh", "-c", f"{sys.executable} {script} >/dev/null 2>&1 & echo $!"],
                    check=True, capture_output=True, text=True)
burner = int(sh.stdout.strip())
cpu = TreeCpu(interval_s=0.05)
before, own = cpu.seconds(), time.process_time()
deadline = time.time() + 30
while os.path.exists(f"/proc/{burner}") and time.time() < deadline:
    time.sleep(0.05)
after, own = cpu.seconds(), time.process_time() - own
cpu.close()
print(json.dumps({"counted": after - before, "own": own, "burner_done": os.path.exists(done)}))
"""


def test_tree_cpu_ignores_a_process_outside_its_tree(tmp_path: Path) -> None:
    # A fresh process measures, so its tree is itself alone (a long pytest session has children of its own:
    # servers and clusters of other tests). Its shell starts the burner in the background and exits: the burner
    # is re-parented away from the probe.
    import json

    script, done = tmp_path / "burn.py", tmp_path / "done"
    script.write_text(BURN.format(s=0.8) + f"open({str(done)!r}, 'w').close()\n")
    out = subprocess.run([sys.executable, "-c", PROBE, str(script), str(done)], check=True, capture_output=True,
                         text=True, timeout=60)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["burner_done"]  # the burner really ran its 0.8 s
    assert probe["counted"] - probe["own"] < 0.2  # only the probe's own CPU counted, not the burner's 0.8 s
