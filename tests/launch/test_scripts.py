"""The launch scripts: --dry-run prints the exact gcloud / sbatch / srun commands; bad arguments
exit 2 with a message; --help works; shellcheck finds nothing."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "launch").rglob("*.sh")) + sorted((REPO / "launch").rglob("*.sbatch"))
EXECUTABLE = [p for p in SCRIPTS if p.read_text().startswith("#!")]  # Not the sourced helpers.


def run(script, *args, env=None):
    # DRY_RUN=1 as well as --dry-run: a test must never reach gcloud, sbatch or a GPU.
    env = {**(env or os.environ), "DRY_RUN": "1"}
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)


def commands(script, *args, env=None):
    """The dry-run output as argument lists (comment lines kept as text)."""
    result = run(script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return [line if line.startswith("#") else shlex.split(line)
            for line in result.stdout.splitlines()]


def test_create_spot_slice():
    assert commands("tpu/create.sh", "--name=run1", "--accelerator-type=v5p-256",
                    "--zone=us-east5-a", "--spot", "--project=proj") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "run1", "--node-id=run1",
         "--zone=us-east5-a", "--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5",
         "--project=proj", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "run1", "--zone=us-east5-a",
         "--format=value(state.state)", "--project=proj"],
    ]


def test_create_multislice_preemptible():
    out = commands("tpu/create.sh", "--name", "ms", "--accelerator-type", "v5litepod-16",
                   "--zone", "us-west4-a", "--num-slices", "2", "--preemptible",
                   "--runtime-version=v2-alpha-tpuv5-lite", "--no-wait", "--workers=4")
    assert out == [["gcloud", "compute", "tpus", "queued-resources", "create", "ms",
                    "--node-count=2", "--node-prefix=ms", "--zone=us-west4-a",
                    "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                    "--best-effort"]]


def test_setup_copies_checkout_and_installs_tpu_jax(tmp_path):
    out = commands("tpu/setup.sh", "--name=run1", "--zone=z1", env={"TMPDIR": str(tmp_path),
                                                                       "PATH": "/usr/bin:/bin"})
    archive = f"{tmp_path}/transformer-src.tar.gz"
    assert out[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", archive, "HEAD"]
    assert out[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
                      "run1:transformer-src.tar.gz", "--zone=z1", "--worker=all"]
    assert out[2][:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "run1", "--zone=z1",
                          "--worker=all"]
    remote = out[2][8]
    assert remote.startswith("--command=")
    assert "python3.11 -m venv ~/venv" in remote
    assert "tar -xzf ~/transformer-src.tar.gz -C ~/transformer" in remote
    assert remote.endswith("~/venv/bin/pip install -q -r ~/transformer/requirements.txt "
                           "'jax[tpu]==0.10.2'")


def test_setup_clone_on_every_slice():
    out = commands("tpu/setup.sh", "--name=ms", "--zone=z1", "--num-slices=2",
                   "--repo-url=https://example.com/t.git", "--ref=v1")
    assert [c[5] for c in out] == ["ms-0", "ms-1"]
    assert all("git clone -q https://example.com/t.git ~/transformer && git -C ~/transformer "
               "checkout -q v1" in c[8] for c in out)


def test_run_on_all_workers_with_gcs_workdir():
    out = commands("tpu/run.sh", "--name=run1", "--zone=z1", "--accelerator-type=v5p-64",
                   "--workers=8", "--workdir=gs://bucket/gpt2", "--",
                   "--config=configs/gpt2_pretrain.py", "--config.num_train_steps=100")
    assert out == [[
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "run1", "--zone=z1", "--worker=all",
        "--command=set -o pipefail; cd ~/transformer && ~/venv/bin/python -m transformer.main "
        "--workdir=gs://bucket/gpt2 --config=configs/gpt2_pretrain.py "
        "--config.num_train_steps=100 --config.distributed.num_processes=8 2>&1 | tee ~/train.log",
    ]]


def test_run_multislice_detached():
    out = commands("tpu/run.sh", "--name=ms", "--zone=z1", "--accelerator-type=v5litepod-16",
                   "--num-slices=2", "--detach", "--workdir=gs://b/r", "--", "--config=c.py")
    assert out[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "ms-0", "--zone=z1",
                      "--format=value(networkEndpoints[0].ipAddress)"]
    for i, command in enumerate(out[1:]):
        assert command[5] == f"ms-{i}"
        remote = command[8]
        assert remote.startswith(
            f"--command=export MEGASCALE_COORDINATOR_ADDRESS=$COORDINATOR_IP:8080 "
            f"MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID={i} MEGASCALE_PORT=8080; nohup bash -c ")
        assert "--config.distributed.num_processes=8" in remote
        assert remote.endswith("> ~/train.log 2>&1 < /dev/null &")
    assert len(out) == 3


def test_logs_and_delete():
    assert commands("tpu/logs.sh", "--name=run1", "--zone=z1", "--follow", "--lines=50") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "run1", "--zone=z1", "--worker=0",
         "--command=tail -n 50 -F ~/train.log"]]
    assert commands("tpu/logs.sh", "--name=run1", "--zone=z1", "--worker=3", "--fetch=/tmp/l") == [
        ["mkdir", "-p", "/tmp/l"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "run1:train.log", "/tmp/l/run1-w3.log",
         "--zone=z1", "--worker=3"]]
    assert commands("tpu/delete.sh", "--name=run1", "--zone=z1") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "run1", "--zone=z1",
         "--force", "--quiet"]]


def gpu_xla_flags() -> str:
    """The flags of launch/gpu/xla_flags.txt, as the GPU scripts put them in XLA_FLAGS."""
    lines = (line.split("#", 1)[0].strip()
             for line in (REPO / "launch/gpu/xla_flags.txt").read_text().splitlines())
    return " ".join(line for line in lines if line)


NO_XLA_FLAGS = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def test_slurm_one_process_per_gpu_and_per_node():
    out = commands("gpu/slurm.sh", "--nodes=4", "--gpus-per-node=8", "--partition=a100",
                   "--time=24:00:00", "--workdir=/scratch/gpt2", "--", "--config=c.py",
                   env=NO_XLA_FLAGS)
    assert out == [
        ["env", f"XLA_FLAGS={gpu_xla_flags()}",
         "sbatch", "--job-name=transformer", "--nodes=4", "--ntasks-per-node=8",
         "--gpus-per-node=8", "--partition=a100", "--time=24:00:00",
         "--output=/scratch/gpt2/slurm-%j.out", "launch/gpu/train.sbatch",
         "--workdir=/scratch/gpt2", "--config=c.py"],
        "# the job runs on 32 task(s): srun --kill-on-bad-exit=1 python -m transformer.main "
        "--workdir=/scratch/gpt2 --config=c.py",
    ]
    per_node = commands("gpu/slurm.sh", "--nodes=2", "--mode=per-node", "--workdir=/w", "--",
                        "--config=c.py", "--no-xla-flags")
    assert "--ntasks-per-node=1" in per_node[0] and per_node[1].startswith("# the job runs on 2 ")
    plain = commands("gpu/slurm.sh", "--nodes=2", "--no-xla-flags", "--workdir=/w", "--", "x")
    assert plain[0][0] == "sbatch"
    sbatch = (REPO / "launch/gpu/train.sbatch").read_text()
    assert 'srun --kill-on-bad-exit=1 "${PYTHON:-python}" -m transformer.main "$@"' in sbatch


def test_local_gpus():
    flags = f"XLA_FLAGS={gpu_xla_flags()}"
    assert commands("gpu/local.sh", "--gpus=4", "--workdir=/tmp/w", "--", "--config=c.py",
                    env=NO_XLA_FLAGS) == [
        ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3", flags, "python", "-m", "transformer.main",
         "--workdir=/tmp/w", "--config=c.py"]]
    out = commands("gpu/local.sh", "--gpus=2", "--mode=per-gpu", "--port=9999",
                   "--workdir=/tmp/w", "--", "--config=c.py", env=NO_XLA_FLAGS)
    assert out == [
        ["env", f"CUDA_VISIBLE_DEVICES={i}", "JAX_COORDINATOR_ADDRESS=127.0.0.1:9999",
         "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={i}", flags, "python", "-m", "transformer.main",
         "--workdir=/tmp/w", "--config=c.py"] for i in range(2)]


def test_gpu_xla_flags_come_before_the_callers_and_can_be_left_out():
    own = {**NO_XLA_FLAGS, "XLA_FLAGS": "--xla_dump_to=/tmp/dump"}
    out = commands("gpu/local.sh", "--gpus=1", "--workdir=/w", "--", "x", env=own)
    assert out[0][2] == f"XLA_FLAGS={gpu_xla_flags()} --xla_dump_to=/tmp/dump"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in gpu_xla_flags()
    out = commands("gpu/local.sh", "--gpus=1", "--no-xla-flags", "--workdir=/w", "--", "x", env=own)
    assert out == [["env", "CUDA_VISIBLE_DEVICES=0", "python", "-m", "transformer.main",
                    "--workdir=/w", "x"]]


@pytest.mark.parametrize("script, args, message", [
    ("tpu/create.sh", ["--name=a", "--accelerator-type=v5p-100", "--zone=z"],
     "unknown accelerator type 'v5p-100'"),
    ("tpu/create.sh", ["--name=a", "--accelerator-type=v7x-8", "--zone=z"],
     "unknown accelerator type 'v7x-8'"),
    ("tpu/create.sh", ["--name=a", "--accelerator-type=v5litepod-12", "--zone=z"],
     "v5litepod-N takes N in"),
    ("tpu/create.sh", ["--name=a", "--accelerator-type=v5p-8"], "--zone is required"),
    ("tpu/create.sh", ["--accelerator-type=v5p-8", "--zone=z"], "--name is required"),
    ("tpu/create.sh", ["--name=a", "--accelerator-type=v5litepod-16", "--zone=z", "--workers=2"],
     "--workers=2 does not match v5litepod-16, which has 4 worker host(s)"),
    ("tpu/create.sh", ["--name=a", "--accelerator-type=v5p-8", "--zone=z", "--bogus"],
     "unknown argument '--bogus'"),
    ("tpu/create.sh", ["--name"], "--name needs a value"),
    ("tpu/run.sh", ["--name=a", "--zone=z", "--accelerator-type=v5p-64", "--workdir=/local", "--", "x"],
     "--workdir must be on GCS"),
    ("tpu/run.sh", ["--name=a", "--zone=z", "--accelerator-type=v5p-64", "--workers=4",
                    "--workdir=gs://b/r", "--", "x"], "--workers=4 does not match v5p-64, which has 8"),
    ("tpu/run.sh", ["--name=a", "--zone=z", "--accelerator-type=v5p-64", "--workdir=gs://b/r"],
     "no training arguments"),
    ("tpu/run.sh", ["--name=a", "--zone=z", "--workdir=gs://b/r", "--", "x"],
     "--accelerator-type is required"),
    ("tpu/setup.sh", ["--name=a"], "--zone is required"),
    ("tpu/logs.sh", ["--name=a", "--zone=z", "--worker=x"], "--worker must be a number or 'all'"),
    ("tpu/delete.sh", ["--zone=z"], "--name is required"),
    ("gpu/slurm.sh", ["--workdir=/w", "--", "x"], "--nodes must be a positive number"),
    ("gpu/slurm.sh", ["--nodes=2", "--mode=per-core", "--workdir=/w", "--", "x"],
     "--mode must be per-gpu or per-node"),
    ("gpu/local.sh", ["--gpus=0", "--workdir=/w", "--", "x"], "--gpus must be a positive number"),
    ("gpu/local.sh", ["--gpus=2", "--", "x"], "--workdir is required"),
])
def test_bad_arguments_exit_2(script, args, message):
    result = run(script, "--dry-run", *args)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert not result.stdout.strip() or "Usage" in result.stdout


# The SLURM batch file has no --help: sbatch runs it, submitted by slurm.sh (tested above).
@pytest.mark.parametrize("script", [s for s in EXECUTABLE if s.suffix != ".sbatch"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_help(script):
    result = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("Usage: launch/")


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -r requirements-test.txt"
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
