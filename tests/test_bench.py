"""Bench: FLOPs formulas against hand-computed values, JSON schema, a smoke run on a tiny model, bad flags."""

import json

import pytest

from conftest import tiny_model
from mlx_kvpred.backends.linux_cpu import blas
from mlx_kvpred.auxiliary import make_layer_pruned_aux
from mlx_kvpred.flops import base_ttft_flops, kvp_ttft_flops, linear_params
from mlx_kvpred.bench.run import run_bench
from mlx_kvpred.bundle import new_bundle
from mlx_kvpred.backends.linux_cpu.decode import C_ROWS
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.pipeline import Pipeline

# tiny llama: d=64, 4 heads x 16, 2 kv heads x 16, ffn 96, vocab 97, 4 layers
PER_LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 96  # q, k, v, o, gate/up/down = 30720
HEAD = 2 * 64 * 97


def tiny_pipeline():
    base = tiny_model("llama")
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0])
    return Pipeline(base, new_bundle(base, aux, aux_kind="layer_pruned", layer_map=[0] * 4, aux_layers=[0]))


def test_flops_by_hand():
    pipe = tiny_pipeline()
    assert linear_params(pipe.base.model.layers[0]) == PER_LAYER
    n = 10
    assert base_ttft_flops(pipe.base.model, pipe.base.config, n) == 4 * n * (2 * PER_LAYER + 2 * n * 64) + HEAD
    predictor = 4 * 2 * 32 * 32  # K and V maps 32 -> 32 per base layer (bias not counted)
    expected = ((n - 1) * (2 * PER_LAYER + 2 * (n - 1) * 64) + (n - 1) * 2 * predictor
                + 4 * (2 * PER_LAYER + 2 * n * 64) + HEAD)
    assert kvp_ttft_flops(pipe.base.model, pipe.base.config, pipe.bundle.aux, pipe.bundle.predictor, n) == expected
    tail = ((n - 3) * (2 * PER_LAYER + 2 * (n - 3) * 64) + (n - 3) * 2 * predictor
            + 4 * 3 * (2 * PER_LAYER + 2 * n * 64) + HEAD)  # the base computes the last 3 prompt tokens
    assert kvp_ttft_flops(pipe.base.model, pipe.base.config, pipe.bundle.aux, pipe.bundle.predictor, n, 3) == tail
    assert kvp_ttft_flops(pipe.base.model, pipe.base.config, pipe.bundle.aux, pipe.bundle.predictor, n, n) == (
        base_ttft_flops(pipe.base.model, pipe.base.config, n))


def test_smoke_run_and_json_schema():
    result = run_bench(tiny_pipeline(), lengths=[16, 32], modes=["base", "kvp", "aux", "mlx-lm"], repeats=1,
                       warmup=0, gen_tokens=3)
    json.dumps(result)  # serializable
    assert {"mlx", "mlx_lm", "kvpred_mlx", "blas", "blas_core", "blas_core_fix", "device", "dtypes",
            "threads"} <= result["environment"].keys()
    rows = result["rows"]
    assert len(rows) == 8
    for r in rows:
        for key in ("ttft_median", "ttft_min", "ttft_max", "tpot_median", "prompt_tps", "peak_memory_gb",
                    "ttft_flops", "speedup_measured", "speedup_analytical"):
            assert isinstance(r[key], (int, float)) and r[key] > 0, key
    limits = result["limits"]
    assert limits["gemm_gflops"] > 0 and limits["bandwidth_gbs"] > 0 and {"before", "after"} <= limits.keys()
    for r in rows:  # each mode's prefill as a fraction of the GEMM rate; TPOT against reading the weights once
        assert r["gemm_fraction"] == pytest.approx(r["ttft_flops"] / r["ttft_median"] / (limits["gemm_gflops"] * 1e9))
        assert r["tpot_limit"] > 0 and (r["tpot_vs_limit"] is None) == (r["mode"] == "aux")
    base16 = next(r for r in rows if r["mode"] == "base" and r["prompt_tokens"] == 16)
    assert base16["speedup_analytical"] == 1.0
    kvp32 = next(r for r in rows if r["mode"] == "kvp" and r["prompt_tokens"] == 32)
    assert kvp32["speedup_analytical"] > 1.5  # 1 of 4 layers prefills


def test_keep_modes_in_one_run():
    """kvp@F and specprefill@F rows in one interleaved run, their FLOPs from their own fractions; and the facts
    Pareto reads them beside an eval's needle rows."""
    from mlx_kvpred.bench.facts_pareto import bench_mode, docqa_table, facts_table
    from mlx_kvpred.bench.run import mode_options, pipeline_mode

    assert mode_options("kvp@0.1") == {"exact_keep": 0.1} and mode_options("specprefill@1") == {"keep": 1.0}
    assert pipeline_mode("specprefill@0.3") == "specprefill" and mode_options("kvp") == {}
    from mlx_kvpred.auxiliary import exact_aux_layers
    from mlx_kvpred.predictor import layer_pruned_map

    base = tiny_model("llama")
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0])
    lmap = layer_pruned_map([0], 4)
    pipe = Pipeline(base, new_bundle(base, aux, aux_kind="layer_pruned", layer_map=lmap, aux_layers=[0],
                                     exact_layers=exact_aux_layers([0], lmap)))
    result = run_bench(pipe, lengths=[48], exact_tail=4, repeats=1, warmup=0, gen_tokens=3,
                       modes=["base", "kvp", "kvp@0.5", "specprefill@0.25", "specprefill@1"])
    flops = {r["mode"]: r["ttft_flops"] for r in result["rows"]}
    assert flops["kvp"] < flops["kvp@0.5"] < flops["base"] == flops["specprefill@1"]
    assert flops["specprefill@0.25"] < flops["base"]
    assert {r["runs_as"] for r in result["rows"]} == {"base", "kvp", "specprefill"}
    needle = {"48": {"accuracy": 0.5, "accuracy_se": 0.1, "of_base": 1.0, "vs_base": None}}
    evals = [{"modes": [{"name": "kvp (exact keep 0.5)", "mode": "kvp", "exact_keep": 0.5, "needle": needle},
                        {"name": "specprefill (keep 0.25)", "mode": "specprefill", "keep": 0.25, "needle": needle}]}]
    assert [bench_mode(r) for r in evals[0]["modes"]] == ["kvp@0.5", "specprefill@0.25"]
    table = facts_table(result, evals)
    assert [r["ttft_s"] for r in table] == [
        next(r["ttft_median"] for r in result["rows"] if r["mode"] == m) for m in ("kvp@0.5", "specprefill@0.25")]
    docqa = {"48": {"agreement": 0.8, "agreement_se": 0.02}, "short": {"agreement": 1.0, "agreement_se": 0.0}}
    evals = [{"modes": [{"name": "base", "mode": "base", "docqa": {"48": {"repeat4": 0.1}}},
                        {"name": "kvp (a)", "mode": "kvp", "bundle": "a", "exact_keep": 0.5, "docqa": docqa},
                        {"name": "kvp (b)", "mode": "kvp", "bundle": "b", "exact_keep": 0.0, "docqa": docqa},
                        {"name": "aux (a)", "mode": "aux", "bundle": "a"}]}]
    rows = docqa_table(result, evals, bundle="a")  # the base is the reference; other bundles and "short" left out
    assert [(r["name"], r["length"], r["accuracy"]) for r in rows] == [("base", 48, 1.0), ("kvp (a)", 48, 0.8)]
    assert rows[1]["ttft_s"] == next(r["ttft_median"] for r in result["rows"] if r["mode"] == "kvp@0.5")
    assert len(docqa_table(result, evals)) == 3


@pytest.mark.skipif(not blas.load_fast_blas().gemv_forward, reason="the gemv_forward shim is not loaded")
def test_sgemm_modes_turn_the_shim_off_for_their_runs_only():
    pipe = tiny_pipeline()
    count = blas.gemv_forward_count()
    result = run_bench(pipe, lengths=[16], modes=["kvp-sgemm", "base-sgemm"], repeats=1, warmup=0, gen_tokens=3)
    assert blas.gemv_forward_count() == count  # decode's one-row matmuls stayed sgemm
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["base-sgemm"]["runs_as"] == "base" and rows["kvp-sgemm"]["runs_as"] == "kvp"
    assert rows["base-sgemm"]["speedup_analytical"] is None  # no plain base row to compare with
    assert result["environment"]["gemv_forward"]
    with C_ROWS.off():  # the prompt's last row through MLX's LM head: a one-row matmul
        run_bench(pipe, lengths=[16], modes=["base"], repeats=1, warmup=0, gen_tokens=3)
    assert blas.gemv_forward_count() > count  # and the shim is on again


def test_bad_modes_and_lengths():
    pipe = tiny_pipeline()
    with pytest.raises(KVPredError, match="unknown"):
        run_bench(pipe, lengths=[16], modes=["fast"], repeats=1, warmup=0)
    with pytest.raises(KVPredError, match="does not fit"):
        run_bench(pipe, lengths=[100000], modes=["base"], repeats=1, warmup=0)
    with pytest.raises(KVPredError, match="need a KVP bundle"):
        run_bench(Pipeline(pipe.base, None), lengths=[16], modes=["kvp"], repeats=1, warmup=0)
    with pytest.raises(KVPredError, match="llama"):  # not installed, or (installed) a model that is not a GGUF
        run_bench(pipe, lengths=[16], modes=["llama.cpp"], repeats=1, warmup=0)


def test_profile_times_every_op_kind_and_matches_the_model():
    """bench --profile: every op kind gets time, the model's own prefill is timed beside it, and the GEMM FLOPs
    are the projections'."""
    from mlx_kvpred.bench.profile import KINDS, gemm_flops, profile_models

    pipe = tiny_pipeline()
    result = profile_models(pipe, lengths=[24], step=16)
    assert [(r["model"], r["prompt_tokens"]) for r in result["rows"]] == [("base", 24), ("aux", 24)]
    base = result["rows"][0]
    assert set(base["kinds"]) == set(KINDS) and all(base["kinds"][k] > 0 for k in KINDS)
    assert base["sum"] == pytest.approx(sum(base["kinds"].values())) and base["as_run"] > 0
    assert gemm_flops(pipe.base.model, 24) == 2 * 24 * 4 * PER_LAYER
    assert base["gemm_fraction"] > 0
