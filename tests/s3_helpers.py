"""A real S3-compatible server for tests: moto's standalone server, in this
process, on a free loopback port; and uploading a folder to it."""

import socket

import pytest


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """moto's S3 server on loopback, with the environment pointing pyarrow
    (and shardprop's S3 reader) at it, and a fresh download cache."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "SHARDPROP_S3_ENDPOINT": f"http://127.0.0.1:{port}",
                        "SHARDPROP_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def upload(fs, root, prefix):
    """Every file under `root` to s3://`prefix`/..., creating the bucket."""
    fs.create_dir(prefix.split("/")[0])
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with fs.open_output_stream(f"{prefix}/{path.relative_to(root)}") as out:
                out.write(path.read_bytes())
