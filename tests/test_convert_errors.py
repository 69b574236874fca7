"""`kvpred-mlx convert` bad input: each is one `error: ...` line on stderr naming what is wrong, exit code 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="converter tests need PyTorch: pip install torch==2.13.0")

from test_convert import (BASE_FFN, BASE_KV, BASE_Q, corenet_state_dict, hf_llama_config,  # noqa: E402
                          hf_llama_state_dict, make_llama, make_openelm, make_predictor, openelm_hf_config,
                          predictor_state_dict, write_corenet_checkpoint, write_mlx_lm_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    made = write_corenet_checkpoint(tmp_path_factory.mktemp("convert-errors"))
    d, sd, base, tok = made["dir"], made["sd"], made["base"], made["tok"]
    base_dir = write_mlx_lm_dir(d / "base", openelm_hf_config(base),
                                {f"transformer.{k}": v for k, v in corenet_state_dict(base).items()}, tok)
    other = make_openelm(9, q_heads=BASE_Q, kv_heads=BASE_KV, inter=BASE_FFN)  # same shapes, other weights
    other_dir = write_mlx_lm_dir(d / "other", openelm_hf_config(other),
                                 {f"transformer.{k}": v for k, v in corenet_state_dict(other).items()}, tok)
    # a plain llama aux (HF names) + predictor for the same base
    laux = make_llama(4, dim=32, n_layers=2, n_heads=4, n_kv=1, inter=40)
    (d / "laux").mkdir()
    torch.save(hf_llama_state_dict(laux), d / "laux" / "pytorch_model.bin")
    (d / "laux" / "config.json").write_text(json.dumps(hf_llama_config(laux)))
    lpred = make_predictor(5, laux, base, [0, 0, 0, 1, 1])
    torch.save(predictor_state_dict(lpred, ""), d / "lpred.pt")
    return dict(dir=d, sd=sd, ckpt=d / "kvp.pt", yaml=made["yaml"], base=base_dir,
                other=other_dir, tok=tok, laux=d / "laux", lpred=d / "lpred.pt",
                lpred_sd=predictor_state_dict(lpred, ""))


def run_cli(capsys, *args):
    """The real entry point (mlx_kvpred.cli.main) in-process: (exit code, stderr)."""
    from mlx_kvpred.cli import main

    argv = sys.argv
    sys.argv = ["kvpred-mlx", "convert", *map(str, args)]
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def assert_error(capsys, args, *fragments):
    code, err = run_cli(capsys, *args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def save(path, sd):
    torch.save(sd, path)
    return path


def test_arbitrary_pickle_is_refused(files, tmp_path, capsys):
    bad = save(tmp_path / "pickled.pt", {**files["sd"], "args": argparse.Namespace(lr=1.0)})
    assert_error(capsys, [bad, "--out", tmp_path / "o", "--base-out", tmp_path / "b"],
                 "pickled.pt", "arbitrary pickle", "argparse.Namespace", "weights_only=True")


def test_truncated_files(files, tmp_path, capsys):
    data = files["ckpt"].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert_error(capsys, [tmp_path / "cut.pt", "--out", tmp_path / "o"], "cut.pt", "truncated or corrupt")
    from safetensors.torch import save_file

    save_file(torch.load(files["laux"] / "pytorch_model.bin", weights_only=True), str(tmp_path / "aux.safetensors"))
    data = (tmp_path / "aux.safetensors").read_bytes()
    (tmp_path / "aux.safetensors").write_bytes(data[: len(data) - 100])
    assert_error(capsys, [tmp_path / "aux.safetensors", "--predictor", files["lpred"], "--aux-config",
                          files["laux"] / "config.json", "--model", files["base"], "--out", tmp_path / "o"],
                 "aux.safetensors", "truncated")
    assert_error(capsys, [tmp_path / "nothere.pt", "--out", tmp_path / "o"], "nothere.pt", "not found")


def test_missing_keys_are_named(files, tmp_path, capsys):
    sd = dict(files["sd"])
    del sd["auxiliary.layers.1.ffn.proj_2.weight"]
    assert_error(capsys, [save(tmp_path / "a.pt", sd), "--out", tmp_path / "o", "--model", files["base"]],
                 "missing keys", "layers.1.ffn.proj_2.weight", "(auxiliary)")
    sd = dict(files["sd"])
    del sd["predicter.auxkv_to_basekv.value_transforms.2.bias"]
    assert_error(capsys, [save(tmp_path / "p.pt", sd), "--out", tmp_path / "o", "--model", files["base"]],
                 "missing keys", "predicter.auxkv_to_basekv.value_transforms.2.bias")
    sd = {k: v for k, v in files["sd"].items() if not k.startswith("predicter.")}
    assert_error(capsys, [save(tmp_path / "np.pt", sd), "--out", tmp_path / "o", "--model", files["base"]],
                 "missing keys predicter.auxkv_to_basekv")
    lsd = torch.load(files["laux"] / "pytorch_model.bin", weights_only=True)
    del lsd["model.norm.weight"]
    assert_error(capsys, [save(tmp_path / "l.pt", lsd), "--aux-config", files["laux"] / "config.json", "--predictor",
                          files["lpred"], "--model", files["base"], "--layer-map", "0,0,0,1,1",
                          "--out", tmp_path / "o"],
                 "missing keys", "model.norm.weight")


def test_shape_mismatches_name_tensor_and_shapes(files, tmp_path, capsys):
    sd = dict(files["sd"])
    sd["predicter.auxkv_to_basekv.key_transforms.1.weight"] = torch.zeros(16, 4)
    assert_error(capsys, [save(tmp_path / "s.pt", sd), "--config", files["yaml"], "--model", files["base"],
                          "--out", tmp_path / "o"],
                 "predicter.auxkv_to_basekv.key_transforms.1.weight", "(16, 4)", "expected (16, 8)")
    cfg = json.loads((files["laux"] / "config.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    assert_error(capsys, [files["laux"] / "pytorch_model.bin", "--aux-config", tmp_path / "cfg.json", "--predictor",
                          files["lpred"], "--model", files["base"], "--layer-map", "0,0,0,1,1",
                          "--out", tmp_path / "o"],
                 "model.layers.0.mlp.gate_proj.weight", "(40, 32)", "expected (48, 32)")
    sd = dict(files["sd"])
    sd["auxiliary.layers.0.ffn.proj_1.weight"] = torch.zeros(30, 32)
    assert_error(capsys, [save(tmp_path / "f.pt", sd), "--config", files["yaml"], "--model", files["base"],
                          "--out", tmp_path / "o"], "layers.0.ffn.proj_1.weight", "(30, 32)", "(48, 32)")


@pytest.mark.parametrize("layer_map, fragments", [
    ("0,0,1,1", ["has 4 entries", "the base has 5 layers"]),
    ("0,0,1,1,7", ["reads aux layers [7]", "3 layers"]),
    ("0,1,1,1,2", ["key_transforms.1.weight", "layer map or the models do not fit"]),  # aux layer 1 is wider
])
def test_layer_map_that_does_not_fit(files, tmp_path, capsys, layer_map, fragments):
    assert_error(capsys, [files["ckpt"], "--layer-map", layer_map, "--model", files["base"], "--out", tmp_path / "o"],
                 *fragments)


def test_predictor_for_another_base(files, tmp_path, capsys):
    sd = dict(files["lpred_sd"])
    for kind in ("key", "value"):
        sd[f"{kind}_transforms.5.weight"] = sd[f"{kind}_transforms.4.weight"]
        sd[f"{kind}_transforms.5.bias"] = sd[f"{kind}_transforms.4.bias"]
    assert_error(capsys, [files["laux"], "--predictor", save(tmp_path / "p6.pt", sd), "--model", files["base"],
                          "--layer-map", "0,0,0,1,1", "--out", tmp_path / "o"],
                 "predictor has 6 base layers", "the base has 5 layers")


def test_unknown_architecture(files, tmp_path, capsys):
    cfg = json.loads((files["laux"] / "config.json").read_text())
    (tmp_path / "gpt2.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert_error(capsys, [files["laux"] / "pytorch_model.bin", "--aux-config", tmp_path / "gpt2.json", "--predictor",
                          files["lpred"], "--model", files["base"], "--out", tmp_path / "o"],
                 "unknown architecture", "gpt2", "llama, qwen2, openelm")
    sd = {**files["sd"], "auxiliary.layers.0.attn_norm.bias": torch.zeros(32)}  # a LayerNorm model, not OpenELM
    assert_error(capsys, [save(tmp_path / "ln.pt", sd), "--model", files["base"], "--out", tmp_path / "o"],
                 "unexpected tensors", "layers.0.attn_norm.bias")
    sd = {**files["sd"], "classifier_extra.weight": torch.zeros(3)}
    assert_error(capsys, [save(tmp_path / "x.pt", sd), "--model", files["base"], "--out", tmp_path / "o"],
                 "unexpected keys", "classifier_extra.weight")


def test_base_that_is_not_the_checkpoints(files, tmp_path, capsys):
    assert_error(capsys, [files["ckpt"], "--config", files["yaml"], "--model", files["other"], "--out", tmp_path / "o"],
                 "is not the base", "relative difference")
    llama = make_llama(7, dim=32, n_layers=5)
    ldir = write_mlx_lm_dir(tmp_path / "llama", hf_llama_config(llama), hf_llama_state_dict(llama), files["tok"])
    assert_error(capsys, [files["ckpt"], "--config", files["yaml"], "--model", ldir, "--out", tmp_path / "o"],
                 "is a llama model", "openelm")


def test_missing_options(files, tmp_path, capsys):
    assert_error(capsys, [files["ckpt"], "--model", files["base"], "--out", tmp_path / "o"], "no layer map", "--config")
    assert_error(capsys, [files["ckpt"], "--config", files["yaml"], "--out", tmp_path / "o"], "--model", "--base-out")
    assert_error(capsys, [files["laux"], "--model", files["base"], "--out", tmp_path / "o"], "--predictor")
    assert_error(capsys, [files["laux"], "--predictor", files["lpred"], "--base-out", tmp_path / "b",
                          "--out", tmp_path / "o"], "--base-out")
    assert_error(capsys, [files["ckpt"], "--config", files["yaml"], "--model", files["base"], "--dtype", "fp8",
                          "--out", tmp_path / "o"], "--dtype", "fp32, fp16, bf16")
    (tmp_path / "no-map.yaml").write_text("model:\n  language_modeling:\n    name: kv_prediction\n")
    assert_error(capsys, [files["ckpt"], "--config", tmp_path / "no-map.yaml", "--model", files["base"],
                          "--out", tmp_path / "o"], "no-map.yaml", "auxkv_num_layers_to_basekv_num_layers")
    assert_error(capsys, [files["ckpt"], "--layer-map", "0,x", "--out", tmp_path / "o"], "--layer-map")
    (tmp_path / "aux.bin").write_bytes((files["laux"] / "pytorch_model.bin").read_bytes())  # no config.json beside
    assert_error(capsys, [tmp_path / "aux.bin", "--predictor", files["lpred"], "--model", files["base"],
                          "--out", tmp_path / "o"], "no config.json", "--aux-config")


def test_torch_not_installed(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert_error(capsys, [files["ckpt"], "--model", files["base"], "--out", tmp_path / "o"],
                 "needs PyTorch", "kvpred-mlx[torch]")


@pytest.mark.parametrize("case", ["pickle", "truncated"])
def test_cli_subprocess_one_line_no_traceback(files, tmp_path, case):
    if case == "pickle":
        src = save(tmp_path / "pickled.pt", {"w": torch.ones(2), "cfg": argparse.Namespace(a=1)})
    else:
        data = files["ckpt"].read_bytes()
        src = tmp_path / "cut.pt"
        src.write_bytes(data[: len(data) - 1000])
    r = subprocess.run([sys.executable, "-c", "from mlx_kvpred.cli import main; main()", "convert", str(src),
                        "--out", str(tmp_path / "o"), "--model", str(files["base"])],
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and src.name in lines[0], r.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_nothing_written_when_a_check_fails(files, tmp_path, capsys):
    """--base-out is written only after the layer map and predictor fit; a bad tokenizer is caught first too."""
    assert_error(capsys, [files["ckpt"], "--layer-map", "0,0,1", "--base-out", tmp_path / "b", "--tokenizer",
                          files["tok"], "--out", tmp_path / "o"], "has 3 entries")
    assert_error(capsys, [files["ckpt"], "--config", files["yaml"], "--base-out", tmp_path / "b", "--tokenizer",
                          tmp_path / "no-tokenizer", "--out", tmp_path / "o"], "--tokenizer", "no-tokenizer")
    (tmp_path / "empty-tok").mkdir()  # transformers explains over several lines: all of it, on one
    line = assert_error(capsys, [files["ckpt"], "--config", files["yaml"], "--base-out", tmp_path / "b",
                                 "--tokenizer", tmp_path / "empty-tok", "--out", tmp_path / "o"], "empty-tok")
    assert not line.rstrip().endswith(": )") and len(line) > len(f"error: --tokenizer {tmp_path / 'empty-tok'}: ") + 40
    assert not (tmp_path / "b").exists() and not (tmp_path / "o").exists()
