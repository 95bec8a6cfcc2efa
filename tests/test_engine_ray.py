"""The Ray engine on a real cluster of two nodes on this machine (``ray.cluster_utils``): fetch
``--pairs``, filter and shard give the local engine's outputs byte for byte, with the dataset
on a folder both nodes see or with images and shards on an S3 server (moto); a worker killed
in the middle of a part, a third node lost in the middle of a part and a driver killed with
SIGKILL change nothing in the end; a storage only the driver sees, Ray missing and a bad
address are one-line errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
from conftest import run_vsotools, vsotools_command
from enginekit import file_bytes, image_server, make_images, write_pairs

from vsotools.core.config import Recipe
from vsotools.core.engine import EngineError
from vsotools.dataset.filter import filter_dataset
from vsotools.fetch.stage import fetch
from vsotools.shards.stage import write_shards

PAIRS = 120
SETTINGS = {
    "fetch.part_size": 20,  # 6 parts of photos, 6 metadata parts
    "fetch.allowed_hosts": ["127.0.0.1:*"],
    "fetch.download_retries": 0,
    "shard.maxcount": 15,
    "shard.image_size": 64,
}


@pytest.fixture(scope="module")
def server():
    with image_server(make_images(PAIRS)) as served:
        yield served


@pytest.fixture(scope="module")
def pairs(server, tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", server.url, PAIRS)


def recipe(pairs: Path, **changes) -> Recipe:
    return Recipe().override({**SETTINGS, "fetch.pairs": str(pairs), **changes})


@pytest.fixture(scope="module")
def local(pairs, tmp_path_factory) -> Path:
    """fetch, filter and shard with the local engine: what the Ray engine must equal."""
    root = tmp_path_factory.mktemp("local")
    settings = recipe(pairs)
    fetch(settings, root / "data")
    filter_dataset(root / "data", settings)
    write_shards(settings, root / "data", root / "shards")
    return root


@pytest.fixture(scope="module")
def s3():
    """An S3 server on 127.0.0.1; its address is in the environment before the cluster starts,
    so that every Ray worker reaches it as a real node would through its own configuration."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": endpoint,  # read by fsspec when a worker imports it
        }.items():
            patch.setenv(name, value)
        patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="data")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="module")
def nodes(s3):
    """A head and a second node, one CPU each; this process is connected to it."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
    nodes = Cluster(initialize_head=True, head_node_args=node)
    try:
        nodes.add_node(**node)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, logging_level=logging.WARNING, log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def cluster(nodes) -> str:
    """The address of the cluster of ``nodes``."""
    return nodes.address


def on_ray(pairs: Path, address: str, **changes) -> Recipe:
    return recipe(pairs, **{"engine.kind": "ray", "engine.ray_address": address, **changes})


def nodes_used(caplog) -> list[int]:
    """For each stage run since the last clear: on how many nodes its parts ran."""
    return [len(r.nodes) for r in caplog.records if hasattr(r, "nodes")]


def assert_same_shards(local_shards: dict[str, bytes], manifest: dict, written: dict[str, bytes]):
    expected = json.loads(local_shards["manifest.json"])
    assert manifest["splits"] == expected["splits"]  # names, counts, bytes, sha256 of each
    tars = {name: data for name, data in local_shards.items() if name.endswith(".tar")}
    assert written == tars


@pytest.mark.slow
def test_fetch_filter_and_shard_on_two_nodes_equal_the_local_engine(
    cluster, pairs, local, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="vsotools")
    settings = on_ray(pairs, cluster)
    data, shards = tmp_path / "data", tmp_path / "shards"
    report = fetch(settings, data)
    assert (report.downloaded, report.failed) == (112, 8)
    filter_dataset(data, settings)
    write_shards(settings, data, shards)
    assert nodes_used(caplog) == [2, 2, 2]

    assert file_bytes(data, "metadata/*") == file_bytes(local / "data", "metadata/*")
    assert file_bytes(data, "images/**/*") == file_bytes(local / "data", "images/**/*")
    assert (data / "filtered.parquet").read_bytes() == (
        local / "data/filtered.parquet"
    ).read_bytes()
    manifest = json.loads((shards / "manifest.json").read_text())
    assert_same_shards(file_bytes(local / "shards"), manifest, file_bytes(shards, "*.tar"))


@pytest.mark.slow
def test_images_and_shards_on_s3_equal_the_local_engine(
    cluster, s3, pairs, local, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="vsotools")
    settings = on_ray(pairs, cluster, **{"fetch.image_store": "s3://data/ray"})
    data = tmp_path / "data"
    fetch(settings, data)
    filter_dataset(data, settings)
    write_shards(settings, data, "s3://data/ray/shards")
    assert nodes_used(caplog) == [2, 2, 2]
    assert not (data / "images").exists()

    assert file_bytes(data, "metadata/*") == file_bytes(local / "data", "metadata/*")
    fs = fsspec.filesystem("s3")
    stored = {
        path.removeprefix("data/ray/"): fs.cat_file(path) for path in fs.find("data/ray/images")
    }
    assert stored == file_bytes(local / "data", "images/**/*")
    assert (data / "filtered.parquet").read_bytes() == (
        local / "data/filtered.parquet"
    ).read_bytes()
    written = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.glob("data/ray/shards/*.tar")}
    manifest = json.loads(fs.cat_file("data/ray/shards/manifest.json"))
    assert_same_shards(file_bytes(local / "shards"), manifest, written)

    # The local engine stores to the same kind of place through its own three-step save.
    here = recipe(pairs, **{"fetch.image_store": "s3://data/local"})
    fetch(here, tmp_path / "here")
    assert file_bytes(tmp_path / "here", "metadata/*") == file_bytes(local / "data", "metadata/*")
    assert {
        p.removeprefix("data/local/"): fs.cat_file(p) for p in fs.find("data/local/images")
    } == (stored)

    # An image gone from the store: the folder is not current; a rerun fetches it again, the
    # same bytes, and the next finds everything there (without any download).
    assert fetch(here, tmp_path / "here").already_complete
    victim = sorted(fs.find("data/local/images"))[3]
    fs.rm_file(victim)
    repaired = fetch(here, tmp_path / "here")
    assert repaired.repaired == [victim.removeprefix("data/local/")]
    assert fs.cat_file(victim) == stored[victim.removeprefix("data/local/")]
    assert fetch(here, tmp_path / "here").already_complete


def running_parts() -> list[int]:
    """Ray worker processes running a part now (Ray titles them after the task's function)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    command = fh.read()
            except OSError:
                continue
            if command.startswith(b"ray::_run_on_node"):
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_a_part_is_retried(
    cluster, server, pairs, local, tmp_path
):
    killed: list[int] = []

    def kill_one_worker() -> bool:
        workers = running_parts()
        if workers:
            time.sleep(0.3)  # into the part: some of its images are fetched and stored
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])
        return bool(workers)

    report = fetch_while(kill_one_worker, server, pairs, cluster, tmp_path)
    assert killed, "no part was seen running"
    assert_fetched_as_locally(report, tmp_path, local)


def fetch_while(disturb, server, pairs: Path, cluster: str, out: Path):
    """Fetch ``pairs`` on the cluster with slow images, calling ``disturb()`` in a helper
    thread until it says it has done its harm (or a minute has passed)."""

    def keep_trying() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not disturb():
            time.sleep(0.05)

    server.latency = 0.05  # 20 images over 2 threads: a part takes half a second
    helper = threading.Thread(target=keep_trying)
    helper.start()
    try:
        return fetch(on_ray(pairs, cluster, **{"fetch.download_concurrency": 2}), out)
    finally:
        server.latency = 0.0
        helper.join()


def assert_fetched_as_locally(report, data: Path, local: Path) -> None:
    assert (report.downloaded, report.failed) == (112, 8)
    assert file_bytes(data, "metadata/*") == file_bytes(local / "data", "metadata/*")
    assert file_bytes(data, "images/**/*") == file_bytes(local / "data", "images/**/*")
    assert not list((data / ".incoming").iterdir())


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[1])


@pytest.mark.slow
def test_a_node_lost_in_the_middle_of_a_part_is_retried_on_the_others(
    nodes, cluster, server, pairs, local, tmp_path
):
    from ray._private import ray_constants

    third = nodes.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    nodes.wait_for_nodes()
    raylet = third.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    lost: list[int] = []

    def lose_the_third_node() -> bool:
        with contextlib.suppress(OSError):
            if any(parent(pid) == raylet for pid in running_parts()):
                time.sleep(0.3)  # into the part: some of its images are fetched and stored
                nodes.remove_node(third, allow_graceful=False)  # its raylet and workers
                lost.append(raylet)
        return bool(lost)

    try:
        report = fetch_while(lose_the_third_node, server, pairs, cluster, tmp_path)
    finally:
        if not lost:
            nodes.remove_node(third)
        wait_until_the_head_sees_it_gone(third.node_id)
    assert lost, "no part was seen running on the third node"
    assert_fetched_as_locally(report, tmp_path, local)


def wait_until_the_head_sees_it_gone(node_id: str) -> None:
    """The head marks a node dead only after it has missed its health checks for seconds;
    until then the node is listed as alive (the next test should not meet it)."""
    import ray

    deadline = time.monotonic() + 90
    while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        assert time.monotonic() < deadline, "the head still lists a removed node as alive"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_node_gone_but_still_listed_is_passed_over_when_storage_is_checked(nodes, cluster, local):
    from vsotools.core.engine import open_engine

    ray = pytest.importorskip("ray")
    ghost = nodes.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    nodes.wait_for_nodes()
    nodes.remove_node(ghost, allow_graceful=False)
    try:
        listed = [n for n in ray.nodes() if n["NodeID"] == ghost.node_id and n["Alive"]]
        assert listed, "the head noticed the lost node at once: nothing left to test"
        records = str(local / "data" / "filtered.parquet")
        with open_engine(on_ray(Path("unused"), cluster).engine) as engine:
            engine.check_visible([records])  # the two live nodes see it; the lost one is skipped
            # ... and a live node that does not see a file still stops the stage.
            fsspec.filesystem("memory").pipe("/nowhere/probe", b"only here")
            with pytest.raises(EngineError, match="cannot see memory://nowhere/probe"):
                engine.check_visible(["memory://nowhere/probe"])
    finally:
        wait_until_the_head_sees_it_gone(ghost.node_id)


def recorded(data: Path) -> int:
    try:
        with sqlite3.connect(f"file:{data / 'fetch-state.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM photos WHERE status IS NOT NULL").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_a_killed_driver_continues_where_it_stopped(cluster, server, pairs, local, tmp_path):
    data = tmp_path / "data"
    args = [
        "fetch", "--pairs", pairs, "--out", data, "--engine", "ray", "--ray-address", cluster,
        *(f"--set={key}={','.join(v) if isinstance(v, list) else v}" for key, v in SETTINGS.items()),
    ]  # fmt: skip
    server.latency = 0.1
    driver = subprocess.Popen(
        [*vsotools_command(), *map(str, args), "--set", "fetch.download_concurrency=2"]
    )
    try:
        deadline = time.monotonic() + 90
        while recorded(data) < 20 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, "the fetch ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        server.latency = 0.0
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    before = recorded(data)
    assert 20 <= before < PAIRS
    served = server.served
    result = run_vsotools(*args)
    assert result.returncode == 0, result.stderr
    # The parts recorded before the kill are not fetched again.
    assert server.served - served <= PAIRS - before
    assert file_bytes(data, "metadata/*") == file_bytes(local / "data", "metadata/*")
    assert file_bytes(data, "images/**/*") == file_bytes(local / "data", "images/**/*")
    assert json.loads((data / "fetch-report.json").read_text())["runs"] == 2


@pytest.mark.slow
def test_storage_only_this_machine_sees_stops_the_stage_naming_node_and_path(
    cluster, local, tmp_path
):
    # memory:// lives in this process alone, as a local folder lives on one machine alone.
    settings = Recipe().override({**SETTINGS, "engine.kind": "ray", "engine.ray_address": cluster})
    with pytest.raises(EngineError) as caught:
        write_shards(settings, local / "data", "memory://nowhere/shards")
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(
        r"node \S+ \([0-9a-f]{8}\) cannot see memory://nowhere/shards/\.vsotools-probe-",
        message,
    )
    assert "no such file" in message
    assert not fsspec.filesystem("memory").exists("/nowhere/shards/train-000000.tar")


# --- without a cluster ---------------------------------------------------------------------


def unfiltered(local: Path, tmp_path: Path) -> Path:
    """A copy of the local engine's dataset folder whose filter has still to run."""
    data = tmp_path / "data"
    shutil.copytree(local / "data", data)
    (data / "filter-report.json").unlink()
    return data


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_the_ray_engine_without_ray_says_which_extra_to_install(local, tmp_path):
    # This interpreter, with ray made unimportable as in an environment without the extra.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, "-c", "from vsotools.cli import main; raise SystemExit(main())"]
    data = unfiltered(local, tmp_path)
    for args in (
        ["-q", "shard", data, "--out", tmp_path / "shards", "--engine", "ray"],
        ["-q", "filter", data, "--engine", "ray"],
    ):
        result = subprocess.run(
            [*command, *map(str, args)], capture_output=True, text=True, env=env, check=False
        )
        assert result.returncode == 1
        assert one_line_error(result.stderr) == (
            'vsotools: error: the Ray engine (engine.kind = "ray") needs ray:'
            " pip install 'vsotools[ray]'"
        )
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_a_bad_address_is_one_line_and_changes_nothing(local, tmp_path):
    pytest.importorskip("ray")
    data = unfiltered(local, tmp_path)
    before = file_bytes(data, "[!.]*") | file_bytes(data, "*/**/*")  # all but the lock
    for args in (
        ["-q", "filter", data, "--engine", "ray", "--ray-address", "127.0.0.1:1"],
        ["-q", "shard", data, "--out", tmp_path / "s", "--engine", "ray", "--ray-address", "127.0.0.1:1"],
    ):  # fmt: skip
        result = run_vsotools(*args)
        assert result.returncode == 1
        error = one_line_error(result.stderr)
        assert error.startswith("vsotools: error: cannot reach a Ray cluster at 127.0.0.1:1 ("), (
            error
        )
        assert "ray start --head" in error
    assert file_bytes(data, "[!.]*") | file_bytes(data, "*/**/*") == before
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_a_ray_client_driver_watches_the_client_server_it_connected_to(monkeypatch):
    # Through Ray Client (ray://) the head's GCS may be out of the driver's reach: the server it
    # connected to is the one that tells whether the cluster is still there.
    from vsotools.core.engine import _head_address

    assert _head_address(None, "ray://10.0.0.5:10001") == ("10.0.0.5", 10001)
    assert _head_address(None, "ray://[fd00::5]:10001") == ("fd00::5", 10001)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head.example:10001")
    assert _head_address(None, "auto") == ("head.example", 10001)
    assert _head_address(None, "ray://no-port") is None
