"""Remote storage end to end: a real S3 API (moto's server, on 127.0.0.1, with IAM authentication) as the
DVC remote; push, a fresh clone that pulls instead of recomputing, and the faults a team meets."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_of
from tests.test_pipeline import dvc, ran_stages, sh

pytestmark = pytest.mark.slow
BUCKET = "r1-math-lora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with authentication on: an IAM user with S3 rights, its keys, and a bucket."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env=os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="dvc")
        key = iam.create_access_key(UserName="dvc")["AccessKey"]
        policy = iam.create_policy(PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        iam.attach_user_policy(UserName="dvc", PolicyArn=policy["Policy"]["Arn"])
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket=BUCKET)
        yield {"url": url, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        server.terminate()
        server.wait(timeout=10)


def use_remote(project: Path, s3: dict) -> None:
    """The README's team set-up: remote and endpoint in git, credentials only in .dvc/config.local."""
    dvc(project, "remote", "add", "-f", "-d", "team", f"s3://{BUCKET}/store")
    dvc(project, "remote", "modify", "team", "endpointurl", s3["url"])
    use_credentials(project, s3)


def use_credentials(project: Path, s3: dict, secret: str | None = None) -> None:
    """The two --local lines: all a clone adds, since the remote and its endpoint come with git."""
    dvc(project, "remote", "modify", "--local", "team", "access_key_id", s3["key"])
    dvc(project, "remote", "modify", "--local", "team", "secret_access_key", secret or s3["secret"])


def outputs(project: Path) -> dict[str, str]:
    """sha256 of every file of every cached output in dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    paths = {out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    digests = {}
    for path in paths:
        root = project / path
        for file in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            digests[str(file.relative_to(project))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, s3, reproduced):
    """The pipeline run on fixtures, committed and pushed to the S3 remote."""
    project = copy_of(reproduced, tmp_path_factory.mktemp("remote") / "project")
    use_remote(project, s3)
    dvc(project, "push")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "results")
    return project


def clone(project: Path, target: Path, s3: dict, secret: str | None = None) -> Path:
    """Another machine's set-up (docs/remote-storage.md): git clone, then only the credentials."""
    sh(project.parent, "git", "clone", "-q", str(project), str(target))
    use_credentials(target, s3, secret)
    return target


def test_a_fresh_clone_pulls_every_output_byte_identical_and_reruns_nothing(pushed, s3, tmp_path):
    config = (pushed / ".dvc" / "config").read_text()
    assert s3["url"] in config and s3["secret"] not in config and s3["key"] not in config
    assert ".dvc/config.local" not in sh(pushed, "git", "ls-files", "-co", "--exclude-standard").stdout

    copy = clone(pushed, tmp_path / "clone", s3)
    dvc(copy, "pull")
    assert outputs(copy) == outputs(pushed)
    assert "up to date" in dvc(copy, "status").stdout
    assert ran_stages(dvc(copy, "repro").stdout) == set()


def test_a_push_to_a_remote_that_is_down_fails_clearly_and_a_later_push_completes(pushed, s3, tmp_path):
    copy = clone(pushed, tmp_path / "clone", s3)
    dvc(copy, "pull")
    # something new in the cache to push (a re-run's outputs would be the same to DVC: new cache objects)
    (copy / "notes.bin").write_bytes(os.urandom(4096))
    dvc(copy, "add", "notes.bin")
    before = outputs(copy) | {"notes.bin": hashlib.sha256((copy / "notes.bin").read_bytes()).hexdigest()}
    dvc(copy, "remote", "modify", "team", "endpointurl", f"http://127.0.0.1:{free_port()}")  # nothing listens
    failed = dvc(copy, "push", check=False)
    assert failed.returncode != 0
    assert "could not connect to the endpoint url" in (failed.stdout + failed.stderr).lower()
    assert outputs(copy) | {"notes.bin": hashlib.sha256((copy / "notes.bin").read_bytes()).hexdigest()} == before
    # nothing lost locally
    dvc(copy, "remote", "modify", "team", "endpointurl", s3["url"])
    assert "1 file pushed" in dvc(copy, "push").stdout  # the new object, which the failed push did not send
    assert "Everything is up to date" in dvc(copy, "push").stdout


def test_an_interrupted_pull_completes_when_repeated(pushed, s3, tmp_path):
    copy = clone(pushed, tmp_path / "clone", s3)
    cache = copy / ".dvc" / "cache" / "files"
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    pull = subprocess.Popen([sys.executable, "-m", "dvc", "pull"], cwd=copy, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while pull.poll() is None and time.time() < deadline and not (cache.exists() and any(cache.rglob("*"))):
        time.sleep(0.005)
    pull.send_signal(signal.SIGKILL)  # as a dropped connection or a closed laptop would
    pull.wait()
    dvc(copy, "pull")
    assert outputs(copy) == outputs(pushed)
    assert "up to date" in dvc(copy, "status").stdout


def test_a_corrupted_cache_object_is_detected_not_used(pushed, s3, tmp_path):
    copy = clone(pushed, tmp_path / "clone", s3)
    dvc(copy, "pull")
    lock = yaml.safe_load((copy / "dvc.lock").read_text())
    digest = lock["stages"]["filter"]["outs"][0]["md5"]
    obj = copy / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    good = obj.read_bytes()
    (copy / "data" / "filtered.parquet").unlink()  # a hard link may share the object's bytes
    obj.chmod(0o644)
    obj.write_bytes(good[:-10] + b"corrupted!")
    dvc(copy, "checkout", check=False)
    status = dvc(copy, "status").stdout
    assert "filter" in status and "data/filtered.parquet" in status  # flagged, not taken as up to date
    dvc(copy, "repro")  # rebuilds it from the inputs
    assert outputs(copy)["data/filtered.parquet"] == outputs(pushed)["data/filtered.parquet"]


def test_wrong_credentials_give_a_clear_error(pushed, s3, tmp_path):
    copy = clone(pushed, tmp_path / "clone", s3, secret="not-the-secret")
    result = dvc(copy, "pull", check=False)
    assert result.returncode != 0
    message = (result.stdout + result.stderr).lower()
    assert "signaturedoesnotmatch" in message.replace(" ", "") or "forbidden" in message or "403" in message
    assert "not-the-secret" not in result.stdout + result.stderr  # credentials never in logs
