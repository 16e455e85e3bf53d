"""`nanoseek pretrain` end to end on CPU: the loss falls, a SIGKILLed run resumes bitwise, balancing fixes a
skewed router, and bad input fails with one line before any training."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.recipes.pretrain import PretrainConfig, pretrain
from nanoseek.train.metrics import read_metrics
from models import write_tokenizer

FAST = dict(seq_len=32, batch_size=8, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process training on one thread: the 2-core test machine is shared, and two processes each running 2
    OpenMP threads slow each other down many times over."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), n_docs=2000, seed=0, vocab_size=512)


def test_loss_falls_clearly_within_200_steps(tmp_path, tokenizer_dir):
    cfg = PretrainConfig(model="tiny", steps=200, lr=3e-3, warmup_steps=20, save_every=0, out=str(tmp_path),
                         tokenizer=str(tokenizer_dir), seed=0, **FAST)
    pretrain(cfg)
    from nanoseek import scratch
    assert not getattr(scratch._local, "buffers", {})                       # released when the loop ended
    rec = read_metrics(tmp_path)
    assert [r["step"] for r in rec] == list(range(1, 201))
    first, last = sum(r["ce"] for r in rec[:10]) / 10, sum(r["ce"] for r in rec[-10:]) / 10
    print(f"CE: first 10 steps {first:.3f}, last 10 {last:.3f}")
    assert first > 5.5                     # ~ln(vocab): an untrained model
    assert last < 0.5 * first              # measured: 6.24 -> 1.2
    for key in ("loss", "lr", "tokens_per_s", "mfu", "mtp", "load_ratio", "max_vio", "grad_norm"):
        assert key in rec[-1]
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "expert_load.png").is_file()
    assert (tmp_path / "config.yaml").is_file() and json.loads((tmp_path / "run.json").read_text())["git_revision"]
    model = nanoseek.load_model(tmp_path / "final")                    # HF-format export with its tokenizer
    assert model.config.vocab_size == 512 and (tmp_path / "final" / "tokenizer.json").is_file()


def run_cli(out, *extra):
    # one thread each: two runs share the machine, and bitwise equality needs the same thread count every time
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nanoseek", "pretrain", "--model", "tiny", "--steps", "40",
                             "--save-every", "10", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def test_resume_after_sigkill_is_bitwise(tmp_path):
    """The README commands: train, get killed after a checkpoint, run again with --resume."""
    ref = run_cli(tmp_path / "ref")
    killed = run_cli(tmp_path / "run")
    while not (tmp_path / "run" / "checkpoints" / "step_00000020").exists():
        assert killed.poll() is None, killed.communicate()[1][-2000:]
        time.sleep(0.005)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert ref.wait() == 0, ref.communicate()[1][-2000:]
    done = len(read_metrics(tmp_path / "run"))
    assert 20 <= done < 40                                             # killed mid-run, past step 20
    resumed = run_cli(tmp_path / "run", "--resume")
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err[-2000:]
    assert "steps 20 -> 40" in out or "steps 30 -> 40" in out
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")         # every step, bitwise
    assert len(losses(tmp_path / "ref")) == 40
    a, b = (nanoseek.load_model(tmp_path / d / "final").state_dict() for d in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)                    # weights and balancing biases
    launches = json.loads((tmp_path / "run" / "run.json").read_text())["launches"]
    assert len(launches) == 2 and launches[1]["resumed_from"]


def test_bias_updates_balance_a_skewed_router(tmp_path, tokenizer_dir):
    """A router that sends most tokens to experts 0 and 1 (a direction shared by all embeddings, which their
    gate rows favour): aux-loss-free bias updates spread the load, gamma = 0 leaves it skewed."""
    cfg = nanoseek.ModelConfig.from_name("tiny", vocab_size=512)
    model = nanoseek.build_model(cfg, seed=0)
    v = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    v = 0.2 * v / v.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight += v
        for moe in model.moe_layers():
            moe.gate.weight[:2] += v
    nanoseek.save_model(model, tmp_path / "skewed")

    ratio = {}
    for gamma in ("0", "0.005"):      # V3's 0.001 is for a run of 100K+ steps; 60 steps need a faster bias
        out = tmp_path / f"gamma{gamma}"
        pretrain(PretrainConfig(model=str(tmp_path / "skewed"), tokenizer=str(tokenizer_dir), steps=60,
                                save_every=0, warmup_steps=10, bias_update_speed=gamma, out=str(out), **FAST))
        rec = read_metrics(out)
        first = rec[0]["load_ratio"]
        # per layer, the median over the last 15 steps of max/min tokens per expert (256 tokens x top-2)
        ratio[gamma] = [sorted(r["load_ratio"][i] for r in rec[-15:])[7] for i in range(len(first))]
    print(f"max/min expert load per MoE layer: first step {first}; last 15 steps (median): gamma=0 "
          f"{ratio['0']}, gamma=0.005 {ratio['0.005']}")
    assert min(first) > 50                  # skewed: some experts get (almost) no tokens
    for skewed, balanced in zip(ratio["0"], ratio["0.005"]):
        assert skewed > 50                  # without bias updates it stays skewed (measured ~150-250)
        assert balanced < skewed / 10       # measured ~3-5


def run_main(capsys, *argv):
    rc = main(["pretrain", *argv])
    err = capsys.readouterr().err
    return rc, err.strip().splitlines()


def test_bad_input_is_one_line_before_training(tmp_path, capsys):
    y = tmp_path / "bad.yaml"
    y.write_text("steps: 3\nlearning_rate: 0.1\n")
    out = tmp_path / "run"
    cases = [
        (["--config", str(y)], "unknown key 'learning_rate'"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file or directory"),
        (["--batch-size", "6", "--micro-batch-size", "4"], "batch_size"),
        (["--batch-size", "3", "--micro-batch-size", "2"], "multiple of micro_batch_size"),
        (["--model", "huge"], "not a preset"),
    ]
    for argv, message in cases:
        rc, lines = run_main(capsys, "--out", str(out), "--steps", "3", *argv)
        assert rc == 2
        assert len(lines) == 1 and lines[0].startswith("nanoseek pretrain: error: ") and message in lines[0], lines
        assert not (out / "metrics.jsonl").exists()


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, tokenizer_dir, capsys):
    args = ["--out", str(tmp_path), "--steps", "2", "--tokenizer", str(tokenizer_dir), "--seq-len", "16",
            "--no-progress"]
    assert main(["pretrain", *args]) == 0
    rc, lines = run_main(capsys, *args)
    assert rc == 2 and "pass --resume" in lines[-1]
    assert main(["pretrain", *args, "--resume"]) == 0                  # nothing left to do: re-exports final
    assert "nothing left to train" in capsys.readouterr().out
