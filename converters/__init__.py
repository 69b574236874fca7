"""PyTorch / CoreNet KV-prediction checkpoints -> KVP bundles (`kvpred-mlx convert`; needs the `torch` extra for
.pt/.bin files). Installed as `mlx_kvpred.converters`; the runtime never imports it."""
