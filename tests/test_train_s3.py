"""Training and evaluation read a shard set from object storage (s3:// through fsspec), here a
real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import json

import fsspec
import pytest
from shardkit import tiny_recipe_overrides, write_shard_set

from vsotools.core.config import Recipe
from vsotools.training.evaluate import evaluate
from vsotools.training.train import train

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_shards(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        # What FSSPEC_S3_ENDPOINT_URL sets when fsspec is imported: s3fs's endpoint_url.
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        root = write_shard_set(tmp_path / "shards")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="data")
        for path in sorted(root.iterdir()):
            client.upload_file(str(path), "data", f"sets/tiny/{path.name}")
        yield "s3://data/sets/tiny", root
    finally:
        server.stop()


def test_train_and_evaluate_stream_shards_from_s3(s3_shards, tmp_path):
    url, local = s3_shards
    settings = Recipe().override(tiny_recipe_overrides(model="text", epochs=1, workers=2))
    report = train(settings, url, tmp_path / "run", progress=False)
    assert report.test.n == 80
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train_samples"] == 240
    remote = evaluate(tmp_path / "run" / "checkpoint.pt", url, workers=2, progress=False).metrics
    here = evaluate(tmp_path / "run" / "checkpoint.pt", local, workers=2, progress=False).metrics
    assert remote == here
