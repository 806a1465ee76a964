"""The moto fixture: pyarrow (and so the ledger's Storage) and boto3 both reach it through AWS_ENDPOINT_URL."""
import pyarrow.fs as pafs
from s3_server import list_keys


def test_pyarrow_and_boto3_reach_the_moto_server(s3_server, s3_bucket):
    fs, root = pafs.FileSystem.from_uri(s3_bucket)
    with fs.open_output_stream(f"{root}/a/b.txt") as fh:
        fh.write(b"payload")
    assert list_keys(s3_server, s3_bucket) == ["a/b.txt"]
    with fs.open_input_stream(f"{root}/a/b.txt") as fh:
        assert fh.read() == b"payload"
