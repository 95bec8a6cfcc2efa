"""``vsotools shard`` and ``vsotools filter`` with ``--engine ray --ray-address ADDR`` against a
cluster started the way its docs say (``ray start --head``), as separate commands: the shards
are byte for byte those of the local engine, and so are the filtered records. A cluster stopped
under a running fetch ends it with one line, and the same command on a new cluster finishes it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_vsotools, vsotools_command
from enginekit import file_bytes, image_server, make_images, write_pairs

pytestmark = pytest.mark.slow

# Ray 2.60 clusters authenticate clients with the token in ~/.ray/auth_token; a driver on
# another process says it takes part (docs/distributed.md).
TOKEN_AUTH = {**os.environ, "RAY_AUTH_MODE": "token"}

SETTINGS = [
    "--set=fetch.part_size=20",
    "--set=fetch.allowed_hosts=127.0.0.1:*",
    "--set=shard.maxcount=15",
    "--set=shard.image_size=64",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    with ray_head() as (address, _):
        yield address


@contextlib.contextmanager
def ray_head():
    """``ray start --head --block`` on the loopback address; its own shutdown (SIGTERM to the
    process this started) stops every process it started."""
    pytest.importorskip("ray")
    port = free_port()
    ray = Path(sys.executable).with_name("ray")
    command = [
        str(ray), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
        "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=TOKEN_AUTH,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, "ray start --head ended"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", process
    finally:
        stop_head(process)


def stop_head(process: subprocess.Popen) -> None:
    """What ``ray stop`` does to the cluster, by the process id of its ``ray start``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A dataset folder fetched and filtered with the local engine."""
    root = tmp_path_factory.mktemp("cli")
    with image_server(make_images(80)) as server:
        pairs = write_pairs(root / "pairs.jsonl", server.url, 80)
        fetched = run_vsotools("fetch", "--pairs", pairs, "--out", root / "data", *SETTINGS)
    assert fetched.returncode == 0, fetched.stderr
    filtered = run_vsotools("filter", root / "data")
    assert filtered.returncode == 0, filtered.stderr
    return root / "data"


def test_shard_on_a_ray_start_cluster_writes_the_local_engines_bytes(head, data, tmp_path):
    on_ray = run_vsotools(
        "shard", data, "--out", tmp_path / "ray", "--engine", "ray", "--ray-address", head,
        env=TOKEN_AUTH,
    )  # fmt: skip
    assert on_ray.returncode == 0, on_ray.stderr
    local = run_vsotools("shard", data, "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    assert file_bytes(tmp_path / "ray", "*.tar") == file_bytes(tmp_path / "local", "*.tar")
    manifests = [json.loads((tmp_path / s / "manifest.json").read_text()) for s in ("ray", "local")]
    assert manifests[0]["splits"] == manifests[1]["splits"]
    assert len(file_bytes(tmp_path / "ray", "*.tar")) >= 4


def test_filter_on_a_ray_start_cluster_keeps_the_local_engines_records(head, data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (copy / "filter-report.json").unlink()
    (copy / "filtered.parquet").unlink()
    result = run_vsotools(
        "filter", copy, "--engine", "ray", "--ray-address", head, "--json", env=TOKEN_AUTH
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kept"] > 0
    assert (copy / "filtered.parquet").read_bytes() == (data / "filtered.parquet").read_bytes()


def test_a_cluster_that_goes_away_is_one_line_and_a_new_one_finishes_the_work(tmp_path):
    # Ray ends a driver whose head stopped answering after this many seconds, with a line of
    # its own; vsotools says so in its own words after half of them.
    patience = {**TOKEN_AUTH, "RAY_gcs_rpc_server_reconnect_timeout_s": "20"}
    with image_server(make_images(80)) as server:
        pairs = write_pairs(tmp_path / "pairs.jsonl", server.url, 80)

        def fetch(out: Path, *engine: str) -> list[str]:
            return [
                "fetch", "--pairs", str(pairs), "--out", str(out), *SETTINGS, *engine,
                "--set=fetch.download_concurrency=2", "--set=fetch.download_retries=0",
            ]  # fmt: skip

        server.latency = 0.5  # 4 images at a time: the fetch takes about 10 s
        with ray_head() as (address, process):
            driver = subprocess.Popen(
                [
                    *vsotools_command(),
                    *fetch(tmp_path / "data", "--engine", "ray", "--ray-address", address),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=patience,
            )
            try:
                deadline = time.monotonic() + 90
                while server.served < 12 and driver.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert driver.poll() is None, "the fetch ended before its cluster went away"
                # The head's machine lost at once: every process `ray start` started (its
                # process group, named by the process id of the one this test started).
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                stopped = time.monotonic()
                _, stderr = driver.communicate(timeout=60)
            finally:
                if driver.poll() is None:
                    driver.kill()
                    driver.wait()
        assert driver.returncode == 1
        assert time.monotonic() - stopped < 30
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"vsotools: error: lost the Ray cluster at {address} ("), stderr
        assert last.endswith("run the same command again once it is back to continue")
        assert "Traceback" not in stderr
        server.latency = 0.0
        with ray_head() as (address, _):
            again = run_vsotools(
                *fetch(tmp_path / "data", "--engine=ray", f"--ray-address={address}"),
                env=TOKEN_AUTH,
            )
        assert again.returncode == 0, again.stderr
        local = run_vsotools(*fetch(tmp_path / "local"))
        assert local.returncode == 0, local.stderr
    for pattern in ("metadata/*", "images/**/*"):
        assert file_bytes(tmp_path / "data", pattern) == file_bytes(tmp_path / "local", pattern)
    assert json.loads((tmp_path / "data" / "fetch-report.json").read_text())["runs"] == 2
