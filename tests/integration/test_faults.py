"""Fault and load tests of the extract stage (docs/stages.md: exactly-once, bad input never kills a job).

Each test injects one fault while extract runs — a killed MaskCut actor, a removed Ray node, an S3 server
restart, a corpus of broken files, a SIGKILLed driver — lets the stage finish (with at most one rerun,
which must redo only the missing images) and ends with `helpers.check_extract_exactly_once`. Each prints
one ``FAULT_RESULT <test> k=v ...`` line with the counts it observed (run pytest with -s to see them).

Runs that start their own Ray (the node-kill cluster, the driver under test) do it in a subprocess with
a private RAY_TMPDIR and RAY_ADDRESS=local: this machine is shared, a plain ``ray.init("auto")`` would
join whichever cluster runs here, and the shared /tmp/ray/ray_current_cluster must stay untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from helpers import Background  # tests/ is on sys.path (conftest)

from u2seg.io import RunRoot
from u2seg.pipeline.run_stage import run_stage

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_RAY_POINTER = "/tmp/ray/ray_current_cluster"
FAULT_KNOBS = ["extract.num_actors=2", "extract.batch_size=2", "extract.rows_per_part=2"]


def report(test: str, **counts: Any) -> None:
    """One quotable line per test (the brief asks for stdout, so this is a print, not a log record)."""
    print(f"FAULT_RESULT {test} " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ledger_count(root: RunRoot) -> int:
    from u2seg.pipeline.extract_commit import ledger_ids

    return len(ledger_ids(root))


def maskcut_actors(state_filter: str | None = "ALIVE") -> list[dict]:
    """MaskCut pool actors from the GCS actor table (test clusters run no dashboard for ray.util.state)."""
    from ray._private import state

    return [a for a in state.actors().values()
            if "MaskCutActor" in a["ActorClassName"] and (state_filter is None or a["State"] == state_filter)]


def subset(images: str, n: int, dest: str) -> str:
    """The first n images of a folder, copied into `dest` (a manifest input of its own)."""
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(images))[:n]:
        shutil.copy(os.path.join(images, name), dest)
    return dest


def read_pointer(path: str = SHARED_RAY_POINTER) -> str | None:
    """The GCS address a `ray_current_cluster` file names, None when absent."""
    try:
        with open(path) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None


def ray_processes(ray_tmp: str, pgid: int | None = None) -> list[psutil.Process]:
    """Processes of a Ray started under `ray_tmp`: by the env they inherited, their command line, or group."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            if ray_tmp in " ".join(p.info["cmdline"] or ()) or p.environ().get("RAY_TMPDIR") == ray_tmp or (
                    pgid is not None and os.getpgid(p.pid) == pgid):
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def kill_ray_processes(ray_tmp: str, pgid: int | None = None, grace: float = 10.0) -> tuple[int, int]:
    """Let a dead driver's Ray exit for `grace` s, then SIGKILL (by pid) what is left.

    Returns (processes alive when called, processes that outlived the grace period and were killed here).
    """
    alive = ray_processes(ray_tmp, pgid)
    deadline = time.time() + grace
    left = alive
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = ray_processes(ray_tmp, pgid)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)
    return len(alive), len(left)


def gcs_ports(ray_tmp: str) -> set[str]:
    """Listening ports of the GCS server of a Ray started under `ray_tmp` (what a pointer file would name)."""
    ports = set()
    for p in ray_processes(ray_tmp):
        with contextlib.suppress(psutil.Error):
            if "gcs_server" in (p.cmdline() or [""])[0]:
                conns = p.net_connections("tcp")
                ports |= {str(c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return ports


@contextlib.contextmanager
def private_ray(**extra_env: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(temp dir, env) for a subprocess that starts its own Ray; afterwards none of that Ray is left."""
    ray_tmp = tempfile.mkdtemp(prefix="u2f", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_ADDRESS="local", PYTHONUNBUFFERED="1", **extra_env)
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    try:
        yield ray_tmp, env
    finally:
        kill_ray_processes(ray_tmp, grace=0)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_logged(args: list[str], env: dict[str, str], log_path: str,
               timeout: float) -> subprocess.CompletedProcess:
    """Run to completion in its own session (killed with its whole group on timeout), output to a file."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{args} ran past {timeout}s; see {log_path}") from None
    return subprocess.CompletedProcess(args, proc.returncode)


def tail(path: str, n: int = 4000) -> str:
    """The end of a subprocess log, keeping our own log records and errors (Ray's chatter dropped)."""
    with open(path, "rb") as fh:
        lines = fh.read().decode(errors="replace").splitlines()
    marks = ("u2seg", "Error", "Traceback", "RESULT")
    keep = [ln for ln in lines if any(m in ln for m in marks)]
    return "\n".join(keep)[-n:]


# ----------------------------------------------------------------------------------------------- 1. actor


@pytest.mark.timeout(300)
def test_killed_maskcut_actor_is_restarted_and_nothing_is_lost(ray_cluster, synthetic_world, tmp_path):
    from helpers import check_extract_exactly_once, tiny_config

    cfg = tiny_config(str(tmp_path / "run"), [str(synthetic_world / "images")], None, *FAULT_KNOBS)
    run_stage("manifest", cfg)
    run_stage("stuff", cfg)
    root = RunRoot(cfg.run.run_root)
    before = {a["ActorID"] for a in maskcut_actors(None)}  # earlier tests' actors on the session cluster
    job = Background(run_stage, "extract", cfg)
    victim = wait_for(lambda: next((a for a in maskcut_actors() if a["ActorID"] not in before), None),
                      240, "a live MaskCut actor")
    done_at_kill = ledger_count(root)
    os.kill(victim["Pid"], signal.SIGKILL)  # a crash (OOM kill, segfault), not a polite ray.kill
    job.join(240)
    assert job.error is None, f"extract failed after an actor was killed: {job.error!r}"
    ours = [a for a in maskcut_actors(None) if a["ActorID"] not in before]
    restarts = sum(a["NumRestarts"] for a in ours)
    counts = check_extract_exactly_once(root)
    assert counts["images"] == 24 and counts["errors"] == 0 and counts["masks"] > 0
    assert restarts >= 1 or len(ours) > cfg.extract.num_actors, "the killed actor was not restarted/replaced"
    assert job.result["processed_now"] == 24
    report("actor_kill", images=counts["images"], errors=counts["errors"], masks=counts["masks"],
           done_at_kill=done_at_kill, actor_restarts=restarts, actors_created=len(ours), reruns=0)


# ----------------------------------------------------------------------------------------------- 2. node

NODE_KILL_SCRIPT = textwrap.dedent('''
    """Own 3-node cluster (head + 2 workers, 2 CPUs each); remove a worker mid-extract; rerun if it failed."""
    import json, sys, threading, time

    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    from u2seg.config import load_config
    from u2seg.io import RunRoot
    from u2seg.pipeline.extract_commit import ledger_ids
    from u2seg.pipeline.run_stage import run_stage

    cfg = load_config(sys.argv[1])
    root = RunRoot(cfg.run.run_root)
    mem = 256 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": mem})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=mem) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out = {"attempts": []}

    def attempt():
        box = {}
        def go():
            try:
                box["stats"] = run_stage("extract", cfg)
            except Exception as exc:
                box["error"] = f"{type(exc).__name__}: {exc}"[:800]
        th = threading.Thread(target=go, daemon=True)
        th.start()
        return th, box

    def finish(th, box, timeout):
        th.join(timeout)
        out["attempts"].append({"hung": th.is_alive(), "error": box.get("error"),
                                "processed_now": (box.get("stats") or {}).get("processed_now")})
        return not th.is_alive() and "stats" in box

    th, box = attempt()
    by_node = {w.node_id: w for w in workers}
    victim = None
    deadline = time.time() + 240
    while victim is None and time.time() < deadline and th.is_alive():
        live = [a for a in state.actors().values() if "MaskCutActor" in a["ActorClassName"]
                and a["State"] == "ALIVE" and a["Address"]["NodeID"] in by_node]
        if live:
            victim = by_node[live[0]["Address"]["NodeID"]]
        time.sleep(0.2)
    out["victim_had_actor"] = victim is not None
    victim = victim or workers[0]
    out["done_at_kill"] = len(ledger_ids(root))
    cluster.remove_node(victim, allow_graceful=False)
    ok = finish(th, box, 240)
    if not ok and not out["attempts"][-1]["hung"]:
        out["ledger_before_rerun"] = len(ledger_ids(root))
        ok = finish(*attempt(), 240)
    out["ok"] = ok
    out["actor_restarts"] = sum(a["NumRestarts"] for a in state.actors().values()
                                if "MaskCutActor" in a["ActorClassName"])
    out["maskcut_actors_created"] = sum(1 for a in state.actors().values()
                                        if "MaskCutActor" in a["ActorClassName"])
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
    cluster.shutdown()
''')


@pytest.mark.timeout(600)
def test_removed_worker_node_mid_extract(synthetic_world, tmp_path):
    from helpers import check_extract_exactly_once, tiny_config

    cfg = tiny_config(str(tmp_path / "run"), [str(synthetic_world / "images")], None, *FAULT_KNOBS)
    run_stage("manifest", cfg)
    run_stage("stuff", cfg)
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml(redact=False))
    (tmp_path / "node_kill.py").write_text(NODE_KILL_SCRIPT)
    log_path = str(tmp_path / "node_kill.log")
    with private_ray() as (_, env):
        done = run_logged([sys.executable, str(tmp_path / "node_kill.py"), str(tmp_path / "cfg.yaml")], env,
                          log_path, 560)
    lines = [ln for ln in tail(log_path, 1 << 20).splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, tail(log_path)
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["ok"], out
    counts = check_extract_exactly_once(RunRoot(cfg.run.run_root))
    assert counts["images"] == 24 and counts["errors"] == 0
    attempts = out["attempts"]
    if len(attempts) == 2:  # the first run failed cleanly: the rerun did exactly the missing images
        assert attempts[1]["processed_now"] == 24 - out["ledger_before_rerun"], out
    else:
        assert attempts[0]["processed_now"] == 24, out
    report("node_kill", images=counts["images"], errors=counts["errors"], masks=counts["masks"],
           done_at_kill=out["done_at_kill"], victim_had_actor=out["victim_had_actor"],
           actor_restarts=out["actor_restarts"], actors_created=out["maskcut_actors_created"],
           reruns=len(attempts) - 1, first_error=json.dumps((attempts[0]["error"] or "none")[:120]))


# ----------------------------------------------------------------------------------------------- 3. S3


OUTAGE_S = 20


@pytest.mark.timeout(420)
def test_s3_restart_during_writes(ray_cluster, s3, synthetic_world, tmp_path):
    from helpers import check_extract_exactly_once, tiny_config

    root_uri = s3.uri(f"faults-{time.time_ns()}")
    cfg = tiny_config(root_uri, [str(synthetic_world / "images")], s3, *FAULT_KNOBS)
    run_stage("manifest", cfg)
    run_stage("stuff", cfg)
    root = RunRoot(root_uri, cfg.run.storage.storage_options())
    job = Background(run_stage, "extract", cfg)
    wait_for(lambda: root.list("extract/images", ".parquet") or not job.alive(), 240, "the first ledger part")
    assert job.alive(), f"extract ended before the restart: {job.error or job.result}"
    done_at_restart = ledger_count(root)
    t0 = time.time()
    with s3.outage():  # down for longer than s3fs's own retries last: run.storage.retry_s must carry the writes
        time.sleep(OUTAGE_S)
    down_s = round(time.time() - t0, 1)
    job.join(300)
    assert job.error is None, (f"extract failed through a {down_s}s outage: {job.error!r}, caused by "
                               f"{getattr(job.error, 'cause', None) or job.error.__cause__!r}")
    processed = job.result["processed_now"]
    assert processed == 24
    counts = check_extract_exactly_once(root)
    assert counts["images"] == 24 and counts["errors"] == 0
    report("s3_restart", images=counts["images"], errors=counts["errors"], masks=counts["masks"],
           done_at_restart=done_at_restart, server_down_s=down_s, reruns=0, processed=processed)


# ----------------------------------------------------------------------------------------------- 4. odd input


@pytest.mark.timeout(300)
def test_broken_and_odd_images_become_error_rows(ray_cluster, synthetic_world, write_odd_corpus, tmp_path):
    from helpers import check_extract_exactly_once, tiny_config

    from u2seg.io.images import image_id_for
    from u2seg.io.listing import is_image_name

    odd = tmp_path / "inputs" / "odd"
    odd.mkdir(parents=True)
    expected = write_odd_corpus(str(odd))
    good = subset(str(synthetic_world / "images"), 4, str(tmp_path / "inputs" / "good"))
    cfg = tiny_config(str(tmp_path / "run"), [str(tmp_path / "inputs")], None)
    run_stage("manifest", cfg)
    run_stage("stuff", cfg)
    stats = run_stage("extract", cfg)
    root = RunRoot(cfg.run.run_root)
    counts = check_extract_exactly_once(root)
    listed = {n: e for n, e in expected.items() if is_image_name(n)}
    want = {image_id_for(str(odd / n)): r for n, r in listed.items() if isinstance(r, str)}
    manifest = root.read_parquet("manifest", columns=["uri"]).column("uri").to_pylist()
    assert sorted(manifest) == sorted([str(odd / n) for n in listed] + [os.path.join(good, n)
                                                                        for n in os.listdir(good)])
    errors = {r["image_id"]: r for r in root.read_parquet("extract/errors").to_pylist()}
    assert set(errors) == set(want), sorted(r["uri"] for r in errors.values())
    wrong = {errors[i]["uri"]: (errors[i]["error_class"], reason) for i, reason in want.items()
             if not errors[i]["error_class"].endswith(f":{reason}") or not errors[i]["message"]}
    assert not wrong, wrong
    ledger = root.read_parquet("extract/images", columns=["image_id", "status"]).to_pylist()
    ok = {r["image_id"] for r in ledger if r["status"] == "ok"}
    assert len(ok) == len(manifest) - len(want) and stats["errors"] == len(want)
    report("odd_corpus", images=counts["images"], errors=counts["errors"], ok=len(ok), masks=counts["masks"],
           reasons=",".join(sorted({r["error_class"].split(":")[-1] for r in errors.values()})), reruns=0)


# ----------------------------------------------------------------------------------------------- 5. driver


def _text(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode(errors="replace")


def _segments(root: RunRoot) -> dict[str, list]:
    """Each image's segments, keyed by its PNG's name without the group folder (the two runs group differently)."""
    import posixpath

    from u2seg.io.labelset import LabelSet, panoptic_entry

    return {posixpath.basename(panoptic_entry(r)["file_name"]): r["segments"]
            for r in LabelSet(root, "labels").iter_rows(["coco_id", "png", "segments"])}


def _rles(root: RunRoot) -> dict[tuple[str, int], str]:
    rows = root.read_parquet("extract/masks", columns=["image_id", "mask_id", "rle"]).to_pylist()
    return {(r["image_id"], r["mask_id"]): r["rle"]["counts"] for r in rows}


@pytest.mark.timeout(720)
def test_sigkilled_driver_resumes_to_the_same_result(ray_cluster, synthetic_world, tmp_path):
    from helpers import check_extract_exactly_once, tiny_config

    n = 12
    images = subset(str(synthetic_world / "images"), n, str(tmp_path / "images"))
    # three images per part: the resumed run groups the images it still has into other parts than the
    # uninterrupted run does, and the outputs must not depend on that (k-means picks its sample by content);
    # 160 px makes the model slow enough that the first commit comes while most images are still in the actor
    knobs = ["extract.num_actors=1", "extract.batch_size=2", "extract.rows_per_part=3",
             "extract.image_size=160", "run.ray_num_cpus=4"]
    killed_cfg = tiny_config(str(tmp_path / "killed"), [images], None, *knobs)
    clean_cfg = tiny_config(str(tmp_path / "clean"), [images], None, *knobs, "extract.rows_per_part=4")
    yaml_path = tmp_path / "killed.yaml"
    yaml_path.write_text(killed_cfg.to_yaml(redact=False))
    for cfg in (killed_cfg, clean_cfg):
        run_stage("manifest", cfg)
        run_stage("stuff", cfg)
    killed, clean = RunRoot(killed_cfg.run.run_root), RunRoot(clean_cfg.run.run_root)
    log_path = str(tmp_path / "driver.log")
    args = [sys.executable, "-m", "jobs.extract", "--config", str(yaml_path)]
    t0 = time.time()
    with private_ray(RAY_OVERRIDE_RESOURCES=json.dumps({"CPU": 4})) as (ray_tmp, env):
        with open(log_path, "ab") as log:
            driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            # the uninterrupted reference runs meanwhile on the session Ray, but only once the driver's own
            # Ray is up: on a 2-core box a ViT competing with Ray's start-up can push it past Ray's limit
            wait_for(lambda: "images in the manifest" in _text(log_path) or driver.poll() is not None, 300,
                     "the driver's Ray to start")
            reference = Background(run_stage, "extract", clean_cfg)
            wait_for(lambda: killed.list("extract/images", ".parquet") or driver.poll() is not None, 420,
                     "the first ledger part", every=0.05)
            assert driver.poll() is None, f"driver exited ({driver.returncode}) early:\n{tail(log_path)}"
            ports = gcs_ports(ray_tmp)
            os.killpg(driver.pid, signal.SIGKILL)
            parts_at_kill = len(killed.list("extract/images", ".parquet"))
            driver.wait(30)
            alive_after_killpg, outlived = kill_ray_processes(ray_tmp, pgid=driver.pid)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    killed_after_s = round(time.time() - t0)
    assert ports, "the driver's own Ray (under its private RAY_TMPDIR) was not found"
    pointer = read_pointer()
    assert pointer is None or pointer.rsplit(":", 1)[-1] not in ports, f"{SHARED_RAY_POINTER}: {pointer}"
    assert outlived == 0, "Ray processes of the killed driver outlived it"
    done_before_rerun = ledger_count(killed)
    assert done_before_rerun < n and not os.path.exists(killed.path("extract/_SUCCESS"))
    run_stage("extract", killed_cfg)  # a new driver resumes (on the session cluster: no second Ray start)
    stats = killed.read_json("extract/stats.json")
    assert stats["processed_now"] == n - done_before_rerun, stats
    counts = check_extract_exactly_once(killed)
    assert counts["images"] == n and counts["errors"] == 0

    reference.join(300)
    assert reference.error is None, repr(reference.error)
    check_extract_exactly_once(clean)
    same_layout = killed.list("extract/images", ".parquet") == clean.list("extract/images", ".parquet")
    a, b = _rles(killed), _rles(clean)
    assert a.keys() == b.keys() and a == b, f"{sum(a.get(k) != v for k, v in b.items())} masks differ"
    for cfg in (killed_cfg, clean_cfg):
        run_stage("cluster", cfg)
        run_stage("label", cfg)
    seg_a, seg_b = _segments(killed), _segments(clean)
    assert len(seg_a) == n and seg_a == seg_b, [k for k in seg_b if seg_a.get(k) != seg_b[k]]
    report("driver_sigkill", images=counts["images"], errors=counts["errors"], masks=counts["masks"],
           parts_at_kill=parts_at_kill, done_before_rerun=done_before_rerun,
           processed_on_rerun=stats["processed_now"], orphans_removed=stats["orphans_removed"],
           ray_procs_alive_after_killpg=alive_after_killpg, ray_procs_killed_by_test=outlived,
           killed_after_s=killed_after_s, test_s=round(time.time() - t0), reruns=1, same_part_layout=same_layout,
           segments=sum(len(s) for s in seg_a.values()))
