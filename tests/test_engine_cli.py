"""``vsotools shard`` and ``vsotools filter`` with ``--engine ray --ray-address ADDR`` against a
cluster started the way its docs say (``ray start --head``), as separate commands: the shards
are byte for byte those of the local engine, and so are the filtered records."""

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
from conftest import run_vsotools
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
    """``ray start --head --block`` on the loopback address; its own shutdown (SIGTERM to the
    process this fixture started) stops every process it started."""
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
        yield f"127.0.0.1:{port}"
    finally:
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
