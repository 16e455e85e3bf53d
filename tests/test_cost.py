"""`nanoseek cost`: the V3 report's pretraining line, the MFU round trip, config inputs and one-line errors."""
import json
import re

import pytest

import nanoseek
from nanoseek.accounting import count_params, flops_per_token
from nanoseek.cli import main
from nanoseek.cost import DEFAULT_MFU, estimate, load_config, parse_tokens
from nanoseek.errors import CheckpointError, ConfigError, NanoseekError

V3_ARGS = ["cost", "--model", "v3", "--tokens", "14.8T", "--gpu", "H800"]


def _json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek cost: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("text,n", [("14.8T", 14_800_000_000_000), ("500B", 500 * 10**9), ("2k", 2000),
                                    ("1.5M", 1_500_000), ("2e9", 2 * 10**9), ("123", 123), (" 3 T ", 3 * 10**12),
                                    (".5K", 500), (7, 7)])
def test_parse_tokens(text, n):
    assert parse_tokens(text) == n


@pytest.mark.parametrize("text", ["", "T", "14.8X", "1,000", "-5B", "0", "1.2.3T", "abc", "nan"])
def test_parse_tokens_rejects(text):
    with pytest.raises(ConfigError):
        parse_tokens(text)


def test_v3_report_pretraining_line(capsys):
    # V3 report, table 1: 180K H800 GPU-hours per trillion tokens, 14.8T tokens -> 2.664M GPU-hours, $5.328M at $2.
    out = _json(capsys, V3_ARGS + ["--gpu-hours-per-trillion", "180000"])
    assert out["gpu_hours"] == pytest.approx(2.664e6, rel=1e-12)
    assert out["cost_usd"] == pytest.approx(5.328e6, rel=1e-12)
    p = count_params(nanoseek.ModelConfig.from_name("v3"))
    assert out["total_params"] == p.total and out["activated_params"] == p.activated
    assert out["mtp"] is True and out["mtp_params"] == p.mtp
    f = flops_per_token(nanoseek.ModelConfig.from_name("v3"), 4096, training=True, mtp=True)
    assert out["flops_per_token"] == f.total
    # The implied MFU: FLOPs done / (GPU-seconds * dense bf16 peak of an H800, 989.5 TFLOP/s).
    mfu = 1e12 * f.total / (180_000 * 3600 * 989.5e12)
    assert out["mfu"] == pytest.approx(mfu, rel=1e-12)
    assert 0.38 < out["mfu"] < 0.43
    assert out["days"] == pytest.approx(2.664e6 / 2048 / 24)

    # Round trip: that MFU and the same tokens give the report's GPU-hours and dollars back.
    back = _json(capsys, V3_ARGS + ["--mfu", repr(out["mfu"])])
    assert back["gpu_hours"] == pytest.approx(2.664e6, rel=1e-9)
    assert back["cost_usd"] == pytest.approx(5.328e6, rel=1e-9)
    assert back["gpu_hours_per_trillion"] == pytest.approx(180_000, rel=1e-9)
    # ...and the MFU as the table prints it (4 digits) lands within 0.1%: "$5.3M".
    rounded = _json(capsys, V3_ARGS + ["--mfu", f"{out['mfu']:.4f}"])
    assert rounded["gpu_hours"] == pytest.approx(2.664e6, rel=1e-3)
    assert round(rounded["cost_usd"] / 1e6, 1) == 5.3


def test_v3_fp8_mfu_is_half_and_cluster_days(capsys):
    bf16 = _json(capsys, V3_ARGS + ["--gpu-hours-per-trillion", "180000"])
    fp8 = _json(capsys, V3_ARGS + ["--gpu-hours-per-trillion", "180000", "--precision", "fp8"])
    assert fp8["mfu"] == pytest.approx(bf16["mfu"] / 2)                # H800 fp8 dense peak = 2x bf16
    one_t = _json(capsys, ["cost", "--model", "v3", "--tokens", "1T", "--gpu-hours-per-trillion", "180000"])
    assert one_t["days"] == pytest.approx(3.66, abs=0.01)              # report: "3.7 days" per trillion on 2048 GPUs


def test_human_table(capsys):
    assert main(V3_ARGS + ["--gpu-hours-per-trillion", "180000"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())   # label, 2+ spaces, value
    assert rows["GPU-hours"] == "2.664M"
    assert rows["cost"].startswith("$5.328M")
    assert rows["MFU"].startswith("0.40") and "implied" in rows["MFU"]
    values = {line.index(v) for line, v in zip(out.splitlines(), rows.values())}
    assert len(values) == 1                                            # one aligned value column


def test_estimate_formula_by_hand():
    cfg = nanoseek.ModelConfig.from_name("tiny")
    e = estimate(cfg, 10**9, seq_len=128, gpu="h100", precision="bf16", mfu=0.5, num_gpus=8, price=3.0, mtp=False)
    f = flops_per_token(cfg, 128, training=True, mtp=False).total
    hours = 1e9 * f / (0.5 * 989.5e12 * 3600)
    assert e.gpu == "H100" and e.gpu_hours == pytest.approx(hours, rel=1e-12)
    assert e.cost_usd == pytest.approx(3.0 * hours) and e.days == pytest.approx(hours / 8 / 24)
    assert e.mtp_params == 0 and e.flops_breakdown["mtp"] == 0
    b200 = estimate(cfg, 10**9, seq_len=128, gpu="B200", precision="fp8", mfu=0.5, mtp=False)
    assert b200.gpu_hours == pytest.approx(hours * 989.5 / 4500)


def test_mtp_flag(capsys):
    on = _json(capsys, ["cost", "--model", "v3", "--mtp"])
    off = _json(capsys, ["cost", "--model", "v3", "--no-mtp"])
    default = _json(capsys, ["cost", "--model", "v3"])
    assert default["flops_per_token"] == on["flops_per_token"] > off["flops_per_token"]
    assert on["flops_per_token"] - off["flops_per_token"] == on["flops_breakdown"]["mtp"] > 0
    lite = _json(capsys, ["cost", "--model", "v2-lite"])               # no MTP layers: off by default
    assert lite["mtp"] is False and lite["mfu"] == DEFAULT_MFU


def test_model_from_config_json_and_dir(tmp_path, capsys):
    cfg = nanoseek.ModelConfig.from_name("v2-lite")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    want = count_params(cfg).total
    assert _json(capsys, ["cost", "--model", str(tmp_path)])["total_params"] == want
    assert _json(capsys, ["cost", "--model", str(tmp_path / "config.json")])["total_params"] == want
    assert load_config("tiny") == nanoseek.ModelConfig.from_name("tiny")


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert "unknown GPU 'X100'" in _error(capsys, V3_ARGS[:-1] + ["X100"])
    assert "token count '14.8Q'" in _error(capsys, ["cost", "--tokens", "14.8Q"])
    assert "not a preset" in _error(capsys, ["cost", "--model", str(tmp_path / "missing")])
    assert "config.json: not found" in _error(capsys, ["cost", "--model", str(tmp_path)])
    assert "no fp8 tensor cores" in _error(capsys, ["cost", "--gpu", "A100", "--precision", "fp8"])
    assert "--mfu 1.5" in _error(capsys, ["cost", "--mfu", "1.5"])
    assert "--num-gpus 0" in _error(capsys, ["cost", "--num-gpus", "0"])
    (tmp_path / "bad.json").write_text("{not json")
    assert "not valid JSON" in _error(capsys, ["cost", "--model", str(tmp_path / "bad.json")])
    (tmp_path / "other.json").write_text(json.dumps({"model_type": "llama"}))
    assert "model_type" in _error(capsys, ["cost", "--model", str(tmp_path / "other.json")])
    with pytest.raises(SystemExit):                                    # argparse: the two rates exclude each other
        main(["cost", "--mfu", "0.4", "--gpu-hours-per-trillion", "180000"])


def test_library_errors_are_nanoseek_errors(tmp_path):
    with pytest.raises(CheckpointError):
        load_config(str(tmp_path))
    with pytest.raises(NanoseekError):
        estimate(nanoseek.ModelConfig.from_name("tiny"), 100, mfu=0.4, gpu_hours_per_trillion=1.0)


def test_default_mfu_is_the_v3_implied_one_and_reproduces_the_report(capsys):
    """`nanoseek cost --preset v3 --tokens 14.8e12 --gpu h800`: 671B/37B and 2.664M GPU-hours, $5.3M."""
    main(["cost", "--preset", "v3", "--gpu-hours-per-trillion", "180000", "--json"])
    implied = json.loads(capsys.readouterr().out)["mfu"]
    assert abs(implied - DEFAULT_MFU) < 1e-4
    main(["cost", "--preset", "v3", "--tokens", "14.8e12", "--gpu", "h800", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert round(out["total_params"] / 1e9) == 671 and round(out["activated_params"] / 1e9) == 37
    assert round(out["gpu_hours"] / 1e6, 3) == 2.664 and round(out["cost_usd"] / 1e6, 1) == 5.3
