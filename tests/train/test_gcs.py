"""gs:// workdirs, end to end, against a GCS-compatible server on 127.0.0.1 (tests/gcs_server.py).

The trainer runs as users run it, in a fresh process; each client it uses speaks HTTP to the
server: gcsfs (metrics, exported model, plots), tensorstore (Orbax's arrays) and
google-cloud-storage (tensorboardX). The environment keeps every client off the network: anonymous
credentials, and any metadata-server probe pointed at a closed local port.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from etils import epath
from gcsfs.core import GCSFileSystem

from tests.train.test_main import REPO, TINY_TOKENIZER, assert_ok, env, tiny_args

BUCKET = "test-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if server.poll() is not None:
            raise RuntimeError(f"the storage server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the storage server did not answer at {url}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The server's URL, the environment that points every client at it, and a gcsfs client."""
    port = free_port()
    log = tmp_path_factory.mktemp("gcs") / "server.log"
    with log.open("w") as out:  # A file, not a pipe: a full pipe would stall the server.
        server = subprocess.Popen([sys.executable, "-m", "tests.gcs_server", str(port), BUCKET],
                                  cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, server)
        variables = {
            "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage.
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous",  # tensorstore: no credential lookup.
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # No bucket-layout RPC to Google.
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9",
            "GOOGLE_CLOUD_PROJECT": "test",
            # The three runs compile the same programs: compile them once.
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }
        # The plain client: gcsfs.GCSFileSystem may be the variant that asks Google's control
        # plane for the bucket's layout.
        fs = GCSFileSystem(token="anon", endpoint_url=url, skip_instance_cache=True)
        yield {"url": url, "env": {**env(), **variables}, "fs": fs}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(args, gcs):
    return subprocess.run([sys.executable, "-m", "transformer.main", *map(str, args)], cwd=REPO,
                          env=gcs["env"], capture_output=True, text=True, timeout=600)


def gs_args(fixtures, tmp_path, workdir, **overrides):
    overrides.setdefault("data.cache_dir", tmp_path / "data_cache")  # Data caches stay local.
    return tiny_args(fixtures, epath.Path(workdir), **overrides)


def metric_rows(fs, workdir):
    return [json.loads(x) for x in fs.cat(f"{workdir}/metrics.jsonl").decode().splitlines()]


def test_gs_workdir_trains_resumes_and_exports(fixtures, tmp_path, gcs):
    fs, run = gcs["fs"], f"{BUCKET}/run"
    args = dict(checkpoint_every=2, **{"data.cache_dir": tmp_path / "data_cache"})
    assert_ok(main(gs_args(fixtures, tmp_path, f"gs://{run}", num_train_steps=2, **args), gcs))
    assert [r["step"] for r in metric_rows(fs, run)] == [1, 2]
    # A complete checkpoint: on GCS, Orbax marks one with commit_success.txt.
    assert fs.exists(f"{run}/checkpoints/2/commit_success.txt")
    assert fs.exists(f"{run}/checkpoints/2/data/process_0-of-1.json")
    assert fs.find(f"{run}/checkpoints/2/state")
    events = fs.glob(f"{run}/tensorboard/events.out.tfevents.*")
    assert events and fs.size(events[0]) > 0
    assert fs.exists(f"{run}/model/model_config.json") and fs.find(f"{run}/model/params")
    assert fs.exists(f"{run}/model/tokenizer/{TINY_TOKENIZER}")
    assert fs.size(f"{run}/loss.png") > 1000

    # A second run resumes from step 2: steps 1-2 are neither trained nor logged again, and the
    # earlier lines of metrics.jsonl are kept although an object cannot be appended to.
    assert_ok(main(gs_args(fixtures, tmp_path, f"gs://{run}", num_train_steps=3, **args), gcs))
    assert [r["step"] for r in metric_rows(fs, run)] == [1, 2, 3]
    assert fs.exists(f"{run}/checkpoints/3/commit_success.txt")

    # The exported model (and its tokenizer) on gs:// is a starting point for another run.
    result = main(gs_args(fixtures, tmp_path, tmp_path / "finetune", num_train_steps=1,
                          init_from=f"gs://{run}/model", **{"data.tokenizer": ""}), gcs)
    assert_ok(result)
    assert (tmp_path / "finetune" / "model" / "tokenizer" / TINY_TOKENIZER).is_file()


def test_missing_bucket_fails_with_a_clear_error(fixtures, tmp_path, gcs):
    result = main(gs_args(fixtures, tmp_path, "gs://no-such-bucket/run"), gcs)
    assert result.returncode != 0
    assert "the bucket does not exist" in result.stderr, result.stderr[-3000:]
