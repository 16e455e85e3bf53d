"""torchrun --nproc_per_node 2 on CPU (gloo): DDP and FSDP2 reproduce the single-process losses for the same
global batch, since the data streams, loss normalization and balancing loads do not depend on the process count."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from nanoseek.data.pretrain import synthetic_corpus
from nanoseek.tokenizer import train_tokenizer
from nanoseek.train.metrics import read_metrics


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    tok = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts=synthetic_corpus(2000, seed=0), vocab_size=512, out_dir=tok, show_progress=False)
    # global batch 4 = 2 streams of 2: one process accumulates 2 micro-batches, two processes take one each
    return ["pretrain", "--model", "tiny", "--steps", "5", "--batch-size", "4", "--micro-batch-size", "2",
            "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "1", "--save-every", "0", "--tokenizer", str(tok),
            "--no-progress"]


def launch(cmd, check=True):
    """Run cmd in its own process group, so a hang kills torchrun's workers too, not only torchrun."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out: {' '.join(cmd)}\n{err[-3000:]}")
    assert not check or proc.returncode == 0, err[-3000:]
    return proc.returncode, err


def torchrun(nproc, *args):
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "nanoseek", *args])


def test_ddp_and_fsdp2_match_one_process(tmp_path, common):
    launch([sys.executable, "-m", "nanoseek", *common, "--out", str(tmp_path / "one")])
    torchrun(2, *common, "--out", str(tmp_path / "ddp"))
    torchrun(2, *common, "--fsdp", "--out", str(tmp_path / "fsdp"))
    ref = read_metrics(tmp_path / "one")
    assert [r["step"] for r in ref] == [1, 2, 3, 4, 5]
    for name in ("ddp", "fsdp"):
        run = read_metrics(tmp_path / name)
        assert [r["step"] for r in run] == [1, 2, 3, 4, 5], name
        for a, b in zip(ref, run):
            for key in ("loss", "ce", "mtp", "grad_norm"):
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (name, a["step"], key, a[key], b[key])
            assert a["load_ratio"] == b["load_ratio"], (name, a["step"])   # loads summed over ranks
    assert ref[-1]["loss"] < ref[0]["loss"]                                  # it trained
    assert (tmp_path / "fsdp" / "final" / "model.safetensors").is_file()     # rank 0 gathered and exported


def test_fsdp2_checkpoint_resumes_in_one_process(tmp_path, common):
    """A checkpoint holds full (unsharded) state and every data stream, so a run saved by 2 FSDP2 processes
    continues in 1 process with the same losses."""
    torchrun(2, *common, "--fsdp", "--save-every", "2", "--keep-last", "5", "--out", str(tmp_path))
    ref = read_metrics(tmp_path)
    for step in (4, 5):
        shutil.rmtree(tmp_path / "checkpoints" / f"step_{step:08d}")
    launch([sys.executable, "-m", "nanoseek", *common, "--resume", "--no-fsdp", "--out", str(tmp_path)])
    run = read_metrics(tmp_path)
    assert [r["step"] for r in run] == [1, 2, 3, 4, 5]
    assert run[:2] == ref[:2]                                                # kept from before the resume
    for a, b in zip(ref[2:], run[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])


def test_batch_not_divisible_by_processes_is_one_line(tmp_path, common):
    rc, err = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                      "nanoseek", *common, "--batch-size", "2", "--out", str(tmp_path)], check=False)
    assert rc != 0
    errors = [line for line in err.splitlines() if line.startswith("nanoseek pretrain: error:")]
    assert len(errors) == 1 and "processes x micro_batch_size (2 x 2 = 4)" in errors[0], err[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()
