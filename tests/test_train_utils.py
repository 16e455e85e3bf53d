"""Training library pieces: schedules, optimizer groups and clipping, run configs (YAML + flags), metrics and
plots, atomic keep-last-K checkpoints (also when the writer is killed mid-write), and the load balancer."""
import argparse
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import native
from nanoseek.errors import CheckpointError, ConfigError
from nanoseek.recipes.pretrain import PretrainConfig
from nanoseek.train.balance import LoadBalancer
from nanoseek.train.config import add_config_arguments, config_from_args
from nanoseek.train.losses import sequence_balance_loss
from nanoseek.train.metrics import MetricsLog, plot_curves, read_metrics
from nanoseek.train.optim import build_optimizer, clip_grad_norm, clipped_step, param_groups
from nanoseek.train.schedules import lr_at, parse_piecewise, piecewise_at


# ----------------------------------------------------------------------------- schedules
def test_warmup_cosine_by_hand():
    lr = [lr_at(s, 11, 1.0, warmup_steps=2, min_lr_ratio=0.1) for s in range(11)]
    assert lr[0] == pytest.approx(0.5) and lr[1] == pytest.approx(1.0)        # linear warmup
    assert lr[2] == pytest.approx(1.0)                                         # cosine starts at the peak
    assert lr[-1] == pytest.approx(0.1)                                        # ... and ends at min
    mid = 2 + (10 - 2) // 2                                                    # half way: (peak + min) / 2
    assert lr[mid] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lr[1:], lr[2:]))


def test_warmup_stable_decay_by_hand():
    lr = [lr_at(s, 10, 2.0, warmup_steps=1, schedule="wsd", min_lr_ratio=0.0, decay_frac=0.2) for s in range(10)]
    assert lr[:8] == pytest.approx([2.0] * 8)                                  # stable until the last 20%
    assert lr[8:] == pytest.approx([1.0, 0.0])                                 # linear decay to min
    with pytest.raises(ConfigError, match="lr_schedule"):
        lr_at(0, 10, 1.0, schedule="linear")


def test_piecewise_schedules():
    v3_lambda = parse_piecewise("0.3,0.1@0.676")
    assert [piecewise_at(v3_lambda, s, 1000) for s in (0, 675, 676, 999)] == [0.3, 0.3, 0.1, 0.1]
    assert parse_piecewise(0.001) == [(0.0, 0.001)]
    for bad in ("x", "0.1@0.5", "0.1,0.2", "0.1,0.2@0.5,0.3@0.4", "0.1,0.2@1.5"):
        with pytest.raises(ConfigError, match="VALUE,VALUE@FRACTION"):
            parse_piecewise(bad, "mtp_weight")


# ----------------------------------------------------------------------------- optimizer
def test_decay_on_matrices_only():
    model = nanoseek.build_model(nanoseek.ModelConfig.from_name("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert {names[id(p)].rsplit(".", 1)[0].rsplit(".", 1)[-1] for p in no_decay["params"]} >= {
        "input_layernorm", "q_a_layernorm", "norm"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_clip_grad_norm_matches_torch():
    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape, generator=g) * 3
        q.grad = p.grad.clone()
    ref = torch.nn.utils.clip_grad_norm_(b, 1.0).item()
    assert clip_grad_norm(a, 1.0) == pytest.approx(ref)
    for p, q in zip(a, b):
        assert torch.allclose(p.grad, q.grad)
    assert clip_grad_norm(a, 0.0) == pytest.approx(1.0, rel=1e-5)             # measure only



@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [1.0, 1e9, 0.0])
def test_clipped_step_matches_clip_then_step(fused, max_norm):
    """The fused AdamW clips through its grad_scale inside the step; the result is clip_grad_norm + step's (to
    rounding: a division instead of a multiply), bit for bit when nothing clips. foreach scales first."""
    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(64, 8, generator=g)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kind = {"fused": True} if fused else {"foreach": True}
    opt_a, opt_b = (torch.optim.AdamW(ps, lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, **kind) for ps in (a, b))
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g) * 3                        # norm ~40: clips at 1.0
            q.grad = p.grad.clone()
        ref = clip_grad_norm(a, max_norm)
        opt_a.step()
        assert clipped_step(opt_b, b, max_norm) == ref
        assert not hasattr(opt_b, "grad_scale")
        for p, q in zip(a, b):
            if max_norm in (0.0, 1e9):
                assert torch.equal(p, q)
            else:
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9)   # the clipped gradient


def test_restored_optimizer_keeps_this_runs_kernel():
    """A checkpoint saved by an FSDP2 run (foreach AdamW) resumed in one process keeps the fused kernel this run
    built, and with it clipped_step's in-kernel clip; the moments and step count come from the checkpoint."""
    model = torch.nn.Linear(8, 8)
    saving = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True)
    model(torch.ones(2, 8)).sum().backward()
    saving.step()
    saving.zero_grad(set_to_none=True)
    model_state, optim_state = native.gather_state(model, saving)
    resumed = build_optimizer(model, lr=0.1)
    native.restore_state(model, resumed, model_state, optim_state)
    assert all(g["fused"] and not g["foreach"] for g in resumed.param_groups)
    assert resumed.state[model.weight]["step"].item() == 1
    assert torch.equal(resumed.state[model.weight]["exp_avg"], saving.state[model.weight]["exp_avg"])

# ----------------------------------------------------------------------------- run configs
def parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p, PretrainConfig)
    return p.parse_args(argv)


def test_yaml_then_flags(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("steps: 7\nmicro-batch-size: 2\nlr: 1\nfsdp: true\ndata: a.txt\n")
    cfg = config_from_args(PretrainConfig, parse(["--config", str(y), "--steps", "9", "--no-fsdp"]))
    assert (cfg.steps, cfg.micro_batch_size, cfg.lr, cfg.fsdp, cfg.data) == (9, 2, 1.0, False, ["a.txt"])
    assert cfg.batch_size == 8 and cfg.mtp_weight == "0.3,0.1@0.676"          # defaults
    # tokens resolve to steps once, so a saved config never holds both
    cfg = config_from_args(PretrainConfig, parse(["--tokens", "1000", "--batch-size", "2", "--seq-len", "100"]))
    assert (cfg.steps, cfg.tokens) == (5, None)


@pytest.mark.parametrize("text, match", [
    ("stepz: 3\n", "unknown key 'stepz'"),
    ("steps: many\n", "key 'steps' = 'many': expected an integer"),
    ("- 1\n", "expected a mapping"),
    ("lr: [1\n", "not valid YAML"),
    ("mtp_weight: '0.3,0.1'\n", "mtp_weight"),
    ("batch_size: 6\nmicro_batch_size: 4\n", "multiple of micro_batch_size"),
])
def test_bad_yaml_is_one_line(tmp_path, text, match):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        config_from_args(PretrainConfig, parse(["--config", str(y)]))
    assert "\n" not in str(e.value)


def test_help_lists_every_option():
    from nanoseek.recipes import pretrain

    p = argparse.ArgumentParser(prog="nanoseek pretrain", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pretrain.add_arguments(p)
    text = " ".join(p.format_help().split())        # unwrap the help columns
    import dataclasses
    for f in dataclasses.fields(PretrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    for flag in ("--config", "--resume", "--batch-size", "--micro-batch-size", "--seq-len", "--save-every"):
        assert flag in text
    assert "(default: 0.3,0.1@0.676)" in text and "(default: None)" in text


# ----------------------------------------------------------------------------- metrics and plots
def test_metrics_log_resume_drops_steps_past_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s, "load_ratio": [float("inf"), 2.0]})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')                                             # killed mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert read_metrics(tmp_path)[0]["load_ratio"] == [None, 2.0]              # JSON has no inf
    log = MetricsLog(tmp_path, resume_step=3)
    log.log({"step": 4, "loss": 0.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)][2:] == [(3, 1 / 3), (4, 0.0)]
    MetricsLog(tmp_path).close()                                               # a fresh run starts empty
    assert read_metrics(tmp_path) == []
    MetricsLog(tmp_path / "other", enabled=False).log({"step": 1})             # other ranks write nothing
    assert not (tmp_path / "other").exists()


def test_plots_are_pngs(tmp_path):
    records = [{"step": s, "loss": 5 - s / 10, "load_ratio": [1 + s, 2.0]} for s in range(1, 20)]
    for keys, name in ((["loss"], "loss.png"), (["load_ratio"], "load.png")):
        path = plot_curves(records, keys, tmp_path / name, "t", logy=True)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(records, ["reward"], tmp_path / "none.png", "t") is None


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoints_keep_last_k_and_round_trip(tmp_path):
    for step in (10, 20, 30, 40):
        native.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [s for s, _ in native.list_checkpoints(tmp_path)] == [30, 40]
    state = native.load_checkpoint(native.latest_checkpoint(tmp_path))
    assert state["step"] == 40 and state["w"].tolist() == [40.0] * 3
    with pytest.raises(CheckpointError, match="not a nanoseek training checkpoint"):
        native.load_checkpoint(tmp_path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    native.save_checkpoint(tmp_path, 1, {"step": 1})
    with pytest.raises(Exception):
        native.save_checkpoint(tmp_path, 2, {"step": 2, "bad": lambda: 0})    # cannot be pickled
    assert [s for s, _ in native.list_checkpoints(tmp_path)] == [1]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001"]  # no temp dir left


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from nanoseek.checkpoint import native

    class Slow:                       # pickling it announces itself, then blocks: the file is half written
        def __reduce__(self):
            print("writing", flush=True)
            time.sleep(60)
            return (int, (0,))

    native.save_checkpoint(sys.argv[1], 1, {"step": 1, "w": torch.ones(1000)})
    native.save_checkpoint(sys.argv[1], 2, {"step": 2, "w": torch.zeros(1000), "slow": Slow()})
""")


def test_checkpoint_killed_mid_write_never_replaces_the_good_one(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    tmp_dirs = [p for p in os.listdir(tmp_path / "checkpoints") if p.startswith(".step_00000002.tmp-")]
    assert tmp_dirs                                                            # it was mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert native.latest_checkpoint(tmp_path).name == "step_00000001"
    state = native.load_checkpoint(native.latest_checkpoint(tmp_path))
    assert state["step"] == 1 and state["w"].sum().item() == 1000
    native.save_checkpoint(tmp_path, 3, {"step": 3})                          # the next save cleans up
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001", "step_00000003"]


# ----------------------------------------------------------------------------- balancer
def test_load_balancer_counts_and_moves_biases():
    cfg = nanoseek.ModelConfig.from_name("tiny")
    model = nanoseek.build_model(cfg)
    bal = LoadBalancer(model)
    assert len(bal.layers) == 3                                                # 2 main MoE layers + MTP
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, return_mtp=True)
    loss = bal.collect(None, alpha=1e-4)
    (out.logits.sum() * 0 + loss).backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0             # the balance loss reaches the gate
    loads = [x.clone() for x in bal.loads]
    assert all(x.sum().item() == 2 * 16 * cfg.num_experts_per_tok for x in loads)
    stats = bal.step(gamma=0.01)
    for moe, load, ratio in zip(bal.layers, loads, stats["load_ratio"]):
        expected = 0.01 * torch.sign(load.mean() - load).float()
        assert torch.equal(moe.gate.e_score_correction_bias, expected)
        assert ratio == load.max().item() / max(load.min().item(), 1)
    with pytest.raises(RuntimeError, match="before collect"):
        bal.step(gamma=0.01)


def test_load_balancer_loss_over_all_layers_is_the_per_layer_sum():
    """collect() scores every layer's sequence-wise balance loss in one pass over the layers stacked along the
    batch: the same value and gate gradients as summing `sequence_balance_loss` layer by layer, with a mask and a
    normalizer (main and MTP layers alike)."""
    cfg = nanoseek.ModelConfig.from_name("tiny")
    model = nanoseek.build_model(cfg)
    bal = LoadBalancer(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (3, 12), generator=g)
    mask = (torch.rand(3, 12, generator=g) > 0.3).long()
    gates = [moe.gate.weight for moe in bal.layers]

    model(ids, return_mtp=True)
    routing = [moe.routing for moe in bal.layers]
    expected = 0.01 * sum(sequence_balance_loss(s, i, mask, normalizer=5) for s, i in routing)
    expected_grads = torch.autograd.grad(expected, gates, retain_graph=True)
    got = bal.collect(mask, alpha=0.01, normalizer=5)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(got, gates), expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert [x.sum().item() for x in bal.loads] == [mask.sum().item() * cfg.num_experts_per_tok] * len(gates)


def test_tune_allocator_applies_on_glibc():
    import platform

    from nanoseek.train.loop import tune_allocator

    applied = tune_allocator()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_precision_auto_and_the_slow_bf16_warning(monkeypatch, capsys):
    from nanoseek.train import loop

    cpu = torch.device("cpu")
    assert isinstance(loop.cpu_has_fast_bf16(), bool)
    assert loop.resolve_precision("auto", cpu) == "fp32"
    with pytest.raises(ConfigError, match="precision 'fp16'"):
        loop.resolve_precision("fp16", cpu)
    for fast, warned in ((True, False), (False, True)):
        monkeypatch.setattr(loop, "cpu_has_fast_bf16", lambda: fast)
        assert loop.resolve_precision("bf16", cpu) == "bf16"            # what was asked for is kept
        out = capsys.readouterr().out
        assert ("no hardware bf16 matmuls" in out) == warned and out.count("\n") == int(warned)
        assert loop.resolve_precision("bf16", cpu, warn=False) == "bf16"  # ranks other than 0 stay quiet
        assert capsys.readouterr().out == ""


def test_matmul_peak_takes_the_faster_cpu_kernel(monkeypatch):
    """fp32 on CPU times torch's matmul and, where this build has it, oneDNN's, and reports the faster; both
    compute an n x n x n product (oneDNN's op is a @ b^T), so the FLOP count is the same."""
    from nanoseek import hardware
    from nanoseek.train import loop

    rates = iter([1e9, 3e9])
    monkeypatch.setattr(loop, "_sustained_flops", lambda kernel, flops, device, seconds: (kernel(), next(rates))[1])
    peak = loop.matmul_peak_flops(torch.device("cpu"), torch.float32, seconds=0.01)
    a = torch.ones(2, 2)
    assert peak == (3e9 if hardware.onednn_fp32_linear(a, a) else 1e9)
    monkeypatch.undo()
    assert 1e6 < loop.matmul_peak_flops(torch.device("cpu"), torch.float64, seconds=0.01) < 1e14   # one kernel


def test_matmul_peak_of_emulated_bf16_is_the_fp32_one(monkeypatch):
    """Without hardware bf16, nanoseek's heavy ops stay fp32 under autocast, so the bf16 peak MFU is reported
    against is fp32's (timing the emulated bf16 matmul would also take seconds)."""
    from nanoseek import hardware
    from nanoseek.train import loop

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    timed = []
    monkeypatch.setattr(loop, "_sustained_flops",
                        lambda kernel, flops, device, seconds: timed.append(kernel().dtype) or 1e9)
    assert loop.matmul_peak_flops(torch.device("cpu"), torch.bfloat16, seconds=0.01) == 1e9
    assert timed and set(timed) == {torch.float32}
