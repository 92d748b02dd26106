"""The manifest stage on local folders, list files and 20,000 keys in the S3 server."""

from __future__ import annotations

import logging
import threading
import time

import psutil
import pytest

from u2seg.config import ConfigError, load_config
from u2seg.errors import InputsError
from u2seg.io import RunRoot
from u2seg.io.images import image_id_for
from u2seg.io.schemas import MANIFEST_SCHEMA
from u2seg.pipeline.manifest import run_manifest
from u2seg.pipeline.run_stage import run_stage

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)


def _cfg(root_uri: str, inputs: list[str], s3=None, *extra: str):
    overrides = [f"run.run_root={root_uri}", f"manifest.inputs={inputs!r}".replace("'", '"'), *extra]
    if s3 is not None:
        overrides += [f"run.storage.endpoint_url={s3.endpoint_url}", "run.storage.key=u2seg-test-key",
                      "run.storage.secret=u2seg-test-secret", "run.storage.region=us-east-1"]
    return load_config(None, overrides)


def test_local_folder_with_odd_formats_and_junk(tmp_path, write_odd_corpus):
    src = tmp_path / "imgs"
    expected = write_odd_corpus(str(src))
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "deeper" / "x.JPG").write_bytes(b"\xff\xd8junk")
    (src / "sub" / ".hidden.png").write_bytes(b"")
    cfg = _cfg(str(tmp_path / "run"), [str(src)], None, "manifest.probe_sizes=true")
    stats = run_stage("manifest", cfg)
    table = RunRoot(str(tmp_path / "run")).read_parquet("manifest")
    assert table.schema.equals(MANIFEST_SCHEMA)
    uris = table.column("uri").to_pylist()
    names = {u.rsplit("/", 1)[1] for u in uris}
    image_like = {n for n in expected if n.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".tif",
                                                             ".tiff", ".webp"))}
    assert names == image_like | {"x.JPG"}           # junk (.txt, .DS_Store, hidden) never listed
    assert len(uris) == len(set(uris)) == stats["images"]
    ids = table.column("image_id").to_pylist()
    assert ids == [image_id_for(u) for u in uris]
    rows = table.to_pylist()
    good = [r for r in rows if isinstance(expected.get(r["uri"].rsplit("/", 1)[1]), tuple)]
    assert good and all(r["width"] > 0 for r in good)
    # rerun with the same config relists (manifest.refresh) to the same fingerprint; without refresh it is
    # skipped; a changed config relists and leaves no stale parts
    root = RunRoot(str(tmp_path / "run"))
    before = root.read_json("manifest/_SUCCESS")["output"]
    again = run_stage("manifest", cfg)
    assert "skipped" not in again and root.read_json("manifest/_SUCCESS")["output"] == before
    kept = _cfg(str(tmp_path / "run"), [str(src)], None, "manifest.probe_sizes=true", "manifest.refresh=false")
    run_stage("manifest", kept)
    assert run_stage("manifest", kept)["skipped"] is True
    cfg2 = _cfg(str(tmp_path / "run"), [str(src / "sub")], None)
    assert run_stage("manifest", cfg2)["images"] == 1
    assert RunRoot(str(tmp_path / "run")).read_parquet("manifest").num_rows == 1


def test_list_files_text_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n/data/a.jpg\n\ns3://bucket/b.png\n")
    pq.write_table(pa.table({"uri": ["/x/1.jpg", "/x/2.jpg", None]}), tmp_path / "list.parquet")
    cfg = _cfg(str(tmp_path / "run"), [str(lst), str(tmp_path / "list.parquet")])
    assert run_manifest(cfg, RunRoot(str(tmp_path / "run")))["images"] == 4


def test_an_image_listed_twice_is_in_the_manifest_once(tmp_path):
    """Within a list file, across list files, and a list file against a folder, in any spelling."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(b"\xff\xd8")
    lst = tmp_path / "list.txt"
    lst.write_text(f"{folder}/a.jpg\nfile://{folder}/a.jpg\n{folder}/sub/../c.jpg\ns3a://bkt/x.png\n"
                   f"{folder}/c.jpg\n")
    pq.write_table(pa.table({"uri": ["s3://bkt/x.png", "s3://bkt/y.png", f" {folder}/b.jpg "]}),
                   tmp_path / "more.parquet")
    run = tmp_path / "run"
    cfg = _cfg(str(run), [str(lst), str(tmp_path / "more.parquet"), str(folder)], None,
               "manifest.rows_per_part=2")
    stats = run_manifest(cfg, RunRoot(str(run)))
    table = RunRoot(str(run)).read_parquet("manifest")
    uris = sorted(table.column("uri").to_pylist())
    assert uris == sorted([f"{folder}/a.jpg", f"{folder}/b.jpg", f"{folder}/c.jpg", "s3://bkt/x.png",
                           "s3://bkt/y.png"])
    assert stats["images"] == 5 and stats["duplicates_dropped"] == 5
    assert stats["parts"] == len(RunRoot(str(run)).list("manifest", ".parquet"))
    assert table.column("image_id").to_pylist() == [image_id_for(u) for u in table.column("uri").to_pylist()]


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match=r"manifest.inputs"):
        run_manifest(_cfg(str(tmp_path / "r"), []), RunRoot(str(tmp_path / "r")))
    with pytest.raises(ConfigError, match="do not nest"):
        run_manifest(_cfg(str(tmp_path / "r"), [str(tmp_path), str(tmp_path / "a")]), RunRoot(str(tmp_path / "r")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_manifest(_cfg(str(tmp_path / "r"), [str(tmp_path / "nope")]), RunRoot(str(tmp_path / "r")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputsError, match="no images found"):
        run_manifest(_cfg(str(tmp_path / "r"), [str(tmp_path / "empty")]), RunRoot(str(tmp_path / "r")))


class PeakRSS:
    """Samples this process's RSS in a thread; the peak above the starting RSS is what listing cost."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def test_twenty_thousand_keys_in_s3_stream_in_parts(s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())
    n = 20_000
    prefix = f"{s3.bucket}/big-{time.time_ns()}"
    t0 = time.time()
    for start in range(0, n, 2000):  # 10 sub-prefixes, so listing runs in parallel
        fs.pipe({f"{prefix}/shard{start // 2000:02d}/img{i:06d}.jpg": b"x" for i in range(start, start + 2000)})
    fs.pipe_file(f"{prefix}/readme.txt", b"not an image")
    upload_s = time.time() - t0
    root_uri = s3.uri(f"run-{time.time_ns()}")
    cfg = _cfg(root_uri, [f"s3://{prefix}"], s3, "manifest.rows_per_part=1000", "manifest.list_concurrency=8")
    root = RunRoot(root_uri, cfg.run.storage.storage_options())
    with PeakRSS() as mem:
        stats = run_manifest(cfg, root)
    table = root.read_parquet("manifest", columns=["image_id", "uri"])
    assert stats["images"] == table.num_rows == n
    assert len(set(table.column("image_id").to_pylist())) == n
    assert stats["parts"] >= 20 and stats["streams"] == 11
    peak_mb = (mem.peak - mem.base) / 2**20
    log.warning("manifest of %d S3 keys: %.1fs (upload %.1fs), %d parts, peak RSS +%.1f MiB",
                n, stats["seconds"], upload_s, stats["parts"], peak_mb)
    print(f"\nMANIFEST_S3_20K seconds={stats['seconds']} parts={stats['parts']} peak_rss_delta_mib={peak_mb:.1f}")
    assert peak_mb < 200
