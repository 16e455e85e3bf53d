"""`nanoseek eval`: the metric functions against hand-computed values (and math.comb), the loop through the real
task verifiers with a scripted backend, and the real engine: a tiny checkpoint made here (random model + BPE
tokenizer), run in process, through the CLI, and through a real uvicorn `nanoseek serve` app as an endpoint.
"""
import contextlib
import io
import json
import math

import pytest

import nanoseek
from models import tiny_checkpoint
from servers import serve
from nanoseek.cli import main
from nanoseek.data.tasks import get_task
from nanoseek.errors import NanoseekError
from nanoseek.eval import Endpoint, aggregate, completion_text, evaluate, majority_vote, pass_at_k
from nanoseek.inference.server import create_app


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- metrics (pure)
def test_pass_at_k_hand_values_and_binomial_reference():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)                 # c / n
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)          # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 4) == 1.0                                # n - c < k: every 4-subset has a hit
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 4) == 1.0
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert 0 < pass_at_k(1000, 3, 100) < 1                          # binomials this size overflow floats
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote_equivalent_numbers_missing_answers_and_ties():
    assert majority_vote(["5", "4", "4.0", "8/2"]) == 1               # 4 == 4.0 == 8/2: three votes
    assert majority_vote([None, "7", "x", "x"]) == 2                  # None does not vote
    assert majority_vote(["b", "a", "a", "b"]) == 0                   # tie: the value seen first wins
    assert majority_vote(["a  b", "a b", "c"]) == 0                   # whitespace-insensitive text
    assert majority_vote([None, None]) is None and majority_vote([]) is None
    assert majority_vote(["1", "2"], key=lambda a: int(a) % 2 == 0) == 0


def test_aggregate_hand_computed():
    scores = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]]
    answers = [["4", "5", "5", "4"], ["1", None, None, "2"], ["9", "3", "3.0", None]]
    res = aggregate(scores, answers, k=4)
    assert res["pass_at_1"] == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert res["maj_at_k"] == pytest.approx((1 + 0 + 1) / 3)        # ties -> "4", "1"; 3 beats 9
    assert res["pass_at_k"] == pytest.approx((1 + 0 + 1) / 3)
    assert res["answered"] == pytest.approx(9 / 12)
    # k=2 looks at the first two samples for the vote, but pass@2 uses all four (unbiased estimator)
    res2 = aggregate(scores, answers, k=2)
    assert res2["maj_at_k"] == pytest.approx((1 + 0 + 0) / 3)
    assert res2["pass_at_k"] == pytest.approx((pass_at_k(4, 2, 2) * 2) / 3)
    with pytest.raises(ValueError):
        aggregate([[1.0]], [["1"]], k=2)


def test_completion_text_rebuilds_the_think_split():
    assert completion_text({"content": "42"}) == "42"
    assert completion_text({"reasoning_content": "r", "content": " 42"}) == "r</think> 42"
    assert completion_text({"reasoning_content": "still thinking", "content": None}) == "still thinking"
    assert completion_text({"reasoning": "r", "content": "x"}) == "r</think>x"


# ----------------------------------------------------------------------------- the loop, scripted
def test_evaluate_scripted_backend_uses_the_task_verifier():
    items = get_task("arithmetic").generate(3, seed=0)
    seen = {}

    def backend(conversations, opts, progress):
        seen.update(opts, conversations=conversations)
        right = [f"work\n</think>\nThe answer is {it.answer}" for it in items]
        wrong = [f"work\n</think>\n{int(it.answer) + 1}" for it in items]
        return [[(right[0], 5), (right[0], 5), (wrong[0], 3)],         # 2/3 right, majority right
                [(wrong[1], 3), (wrong[1], 3), (right[1], 5)],         # 1/3 right, majority wrong
                [("no close tag", 3), ("<think>open", 3), (wrong[2], 3)]]  # 0/3, two unanswered

    res = evaluate(backend, items, k=3, temperature=0.6, top_p=0.95, seed=7, max_new_tokens=99, system="Be brief.")
    assert seen["k"] == 3 and seen["seed"] == 7 and seen["temperature"] == 0.6 and seen["max_new_tokens"] == 99
    assert seen["conversations"][0] == [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": items[0].question}]
    assert res["pass_at_1"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert res["maj_at_k"] == pytest.approx(1 / 3)
    assert res["pass_at_k"] == pytest.approx(2 / 3)
    assert res["answered"] == pytest.approx(7 / 9)   # "no close tag": no number on the last line; "<think>open": None
    assert res["mean_response_tokens"] == pytest.approx((13 + 11 + 9) / 9)
    assert (res["task"], res["n"], res["k"], res["seed"]) == ("arithmetic", 3, 3, 7)


# ----------------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # random model with lm_head x10 (sharp logits: batch-dependent fp32 rounding cannot flip a greedy near-tie)
    # and a BPE tokenizer trained on synthetic_corpus(300)
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), vocab_size=512, head_scale=10.0)


@pytest.fixture(scope="module")
def llm(ckpt):
    return nanoseek.LLM(ckpt, max_model_len=256)


ITEMS = dict(n=4, seed=0, difficulty=1)


def test_local_eval_is_deterministic_per_seed(llm):
    items = get_task("arithmetic").generate(**ITEMS)
    kw = dict(k=3, temperature=1.0, max_new_tokens=12, return_samples=True)
    a = evaluate(llm, items, seed=5, **kw)
    b = evaluate(llm, items, seed=5, **kw)
    c = evaluate(llm, items, seed=6, **kw)
    assert [s["completions"] for s in a["samples"]] == [s["completions"] for s in b["samples"]]
    assert a["pass_at_1"] == b["pass_at_1"] and a["maj_at_k"] == b["maj_at_k"]
    assert [s["completions"] for s in a["samples"]] != [s["completions"] for s in c["samples"]]
    # the k samples of a problem differ from each other (one stream per completion index)
    assert len(set(a["samples"][0]["completions"])) > 1
    for key in ("pass_at_1", "maj_at_k", "pass_at_k", "n", "k", "task", "seed"):
        assert key in a
    assert 0 < a["mean_response_tokens"] <= 12


def run_cli(argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", *argv, "--json", "--no-progress"]) == 0
    return json.loads(out.getvalue())


def test_cli_json_matches_python_api(ckpt, llm):
    res = run_cli(["--model", str(ckpt), "--task", "arithmetic", "--n", "4", "--seed", "0", "--max-new-tokens", "10"])
    for key in ("pass_at_1", "maj_at_k", "pass_at_k", "n", "k", "task", "seed"):
        assert key in res
    assert (res["n"], res["k"], res["task"], res["seed"]) == (4, 1, "arithmetic", 0)
    want = evaluate(llm, get_task("arithmetic").generate(**ITEMS), max_new_tokens=10)
    assert res["pass_at_1"] == want["pass_at_1"] and res["answered"] == want["answered"]


def test_endpoint_matches_local_engine(ckpt, llm):
    items = get_task("arithmetic").generate(**ITEMS)
    server_llm = nanoseek.LLM(ckpt, max_model_len=256)
    with serve(create_app(server_llm, "tiny-eval", api_key="sekret", ui=False)) as port:
        url = f"http://127.0.0.1:{port}"
        # greedy: the server batches the 4 concurrent requests differently from the local run, and sharp logits
        # keep the argmax the same, so the completions (rebuilt from reasoning_content + content) must agree
        remote = evaluate(Endpoint(url, api_key="sekret", concurrency=4), items, k=2, max_new_tokens=12,
                          return_samples=True)
        local = evaluate(llm, items, k=2, max_new_tokens=12, return_samples=True)
        assert [s["answers"] for s in remote["samples"]] == [s["answers"] for s in local["samples"]]
        assert [s["completions"] for s in remote["samples"]] == [s["completions"] for s in local["samples"]]
        for key in ("pass_at_1", "maj_at_k", "pass_at_k", "answered"):
            assert remote[key] == local[key]
        # the CLI through the same server; the model id comes from /v1/models
        res = run_cli(["--endpoint", url + "/v1", "--api-key", "sekret", "--task", "arithmetic", "--n", "4",
                       "--seed", "0", "--k", "2", "--max-new-tokens", "12"])
        assert res["pass_at_1"] == local["pass_at_1"] and res["k"] == 2
        with pytest.raises(NanoseekError, match="HTTP 401"):
            evaluate(Endpoint(url, api_key="wrong", served_model="tiny-eval"), items[:1])
        with pytest.raises(NanoseekError, match="HTTP 404"):
            evaluate(Endpoint(url, api_key="sekret", served_model="nope"), items[:1])
