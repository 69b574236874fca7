"""ChatSession on tiny random models: prefix reuse, kvp/base spans, repair to the base's exact cache, save/load,
and the auto policy."""

import json
import threading

import mlx.core as mx
import pytest

from conftest import TinyTokenizer, tiny_model
from mlx_kvpred import policy
from mlx_kvpred.attention import backbone
from mlx_kvpred.auxiliary import make_layer_pruned_aux
from mlx_kvpred.bundle import new_bundle
from mlx_kvpred.cache import session_cache
from mlx_kvpred.errors import KVPredError
from mlx_kvpred.pipeline import Pipeline, generate_tokens, prefill_rates, stream_generate
from mlx_kvpred.predictor import layer_pruned_map
from mlx_kvpred.session import ChatSession

USER, ASSISTANT, END = 90, 91, 92  # tiny chat template: [role] content ids [END]


class TinyChatTokenizer(TinyTokenizer):
    """A chat template over text made of token ids (" 5 17 3"): what the detokenizer prints reads back as the
    same ids, so a turn's answer re-renders to the tokens the model generated."""

    chat_template = "tiny"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        ids = []
        for m in messages:
            ids += [USER if m["role"] == "user" else ASSISTANT] + [int(t) for t in m["content"].split()] + [END]
        return ids + [ASSISTANT] if add_generation_prompt else ids


@pytest.fixture(params=["llama", "gemma3"])
def arch(request) -> str:
    """The tiny model family: llama, or gemma3 (sliding-window layers with a window of 8 that every turn crosses)."""
    return request.param


def pipeline(*, identity: bool, seed: int = 0, arch: str = "llama") -> Pipeline:
    """A tiny base (llama: 4 layers, gemma3: 7); aux = its first 2 layers; identity predictor (kvp exact only for a
    full copy) or random."""
    base = tiny_model(arch, seed=seed)
    base.tokenizer = TinyChatTokenizer()
    n = len(base.model.layers)
    kept = list(range(n)) if identity else [0, 1]
    aux, _ = make_layer_pruned_aux(base.model, base.config, kept)
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=layer_pruned_map(kept, n), aux_layers=kept)
    if identity:
        bundle.predictor.set_identity()
    bundle.config.trained = True
    return Pipeline(base, bundle)


def ids(n: int, seed: int) -> list[int]:
    return mx.random.randint(0, 89, (n,), key=mx.random.key(seed)).tolist()


def text(tokens) -> str:
    return " ".join(map(str, tokens))


def base_answer(pipe, prompt, n):
    return [t for t, _ in generate_tokens(pipe, mx.array(prompt), mode="base", max_tokens=n)]


def base_cache(pipe, tokens):
    cache = session_cache(pipe.base.model)  # every position kept, sliding-window layers too
    backbone(pipe.base.model)(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def assert_cache_equals_base(session, atol=1e-4):
    n = len(session.tokens)
    for ours, true in zip(session.cache, base_cache(session.pipe, session.tokens)):
        assert ours.offset == n
        assert mx.allclose(ours.keys[..., :n, :], true.keys[..., :n, :], atol=atol).item()
        assert mx.allclose(ours.values[..., :n, :], true.values[..., :n, :], atol=atol).item()


def test_turns_reuse_the_cached_prefix_and_match_the_base(arch):
    """Exact kvp (full copy, identity): turn 2 reuses turn 1's prompt and answer, processes only its new tokens,
    and both answers equal the base's on the whole conversation."""
    pipe = pipeline(identity=True, arch=arch)
    session = ChatSession(pipe, mode="kvp", exact_tail=4)
    doc = text(ids(60, 1))
    first = [r.token for r in session.stream(doc, max_tokens=6)]
    turn1 = session.turns[-1]
    assert (turn1.cached_tokens, turn1.new_tokens, turn1.predicted_tokens) == (0, 63, 58)  # position 0: exact head
    prompt1 = [USER] + [int(t) for t in doc.split()] + [END, ASSISTANT]
    assert first == base_answer(pipe, prompt1, 6)
    assert session.tokens == prompt1 + first and session.pending_repair == len(session.tokens) - 1
    second = [r.token for r in session.stream(text(ids(5, 2)), max_tokens=6)]
    turn2 = session.turns[-1]
    prompt2 = prompt1 + first + [END, USER] + ids(5, 2) + [END, ASSISTANT]
    assert turn2.cached_tokens == len(prompt1) + 6 and turn2.new_tokens == len(prompt2) - turn2.cached_tokens
    assert turn2.predicted_tokens == turn2.new_tokens - 4 == 5
    assert second == base_answer(pipe, prompt2, 6)


def test_repair_gives_the_base_cache_and_later_turns_base_answers(arch):
    """A random predictor: turn 1 predicted (inexact), a base turn after it; repair() recomputes everything from
    the first predicted position, in chunks, to the base's own K/V, so turn 3 answers as the base does."""
    pipe = pipeline(identity=False, arch=arch)
    session = ChatSession(pipe, mode="kvp", exact_tail=3, repair_chunk=16)
    session.send(text(ids(50, 3)), max_tokens=5)
    session.send(text(ids(4, 4)), max_tokens=5, mode="base")
    assert session.turns[-1].mode == "base" and session.turns[-1].predicted_tokens == 0
    assert session.predicted_tokens == 49 and session.pending_repair == len(session.tokens) - 1
    with pytest.raises(AssertionError):
        assert_cache_equals_base(session)
    steps = []
    assert session.repair(progress=steps.append) == len(session.tokens) - 1
    assert steps[:-1] == [16] * (len(steps) - 1) and session.pending_repair == 0 and session.predicted_spans == []
    assert_cache_equals_base(session)
    messages = session.messages + [{"role": "user", "content": text(ids(6, 5))}]
    expected = base_answer(pipe, pipe.tokenizer.apply_chat_template(messages), 5)
    assert [r.token for r in session.stream(text(ids(6, 5)), max_tokens=5, mode="base")] == expected


def test_repair_stops_between_steps_and_a_turn_waits_for_the_step(arch):
    """stop= ends a repair after the step in progress; a turn can run meanwhile from another thread and the
    repair resumes where it stopped."""
    pipe = pipeline(identity=False, arch=arch)
    session = ChatSession(pipe, mode="kvp", exact_tail=2, repair_chunk=8)
    session.send(text(ids(40, 6)), max_tokens=4)
    stop = threading.Event()
    assert session.repair(stop=stop, progress=lambda n: stop.set()) == 8 and session.exact_until == 1 + 8  # exact head
    def repair_in_thread():
        try:
            session.repair()
        finally:
            mx.clear_streams()  # as every MLX thread must before it ends

    worker = threading.Thread(target=repair_in_thread)
    worker.start()
    session.send(text(ids(3, 7)), max_tokens=3, mode="base")  # holds the lock between repair steps
    worker.join()
    session.repair()
    assert session.pending_repair == 0
    assert_cache_equals_base(session)


def test_diverging_history_trims_the_cache(arch):
    """A conversation that changes inside the cached prefix (an edited turn) reuses only the shared part."""
    pipe = pipeline(identity=True, arch=arch)
    session = ChatSession(pipe, mode="base")
    first = ids(30, 8)
    list(session.stream_tokens(first, max_tokens=4))
    edited = first[:20] + ids(12, 9)
    out = [r.token for r in session.stream_tokens(edited, max_tokens=4)]
    assert session.turns[-1].cached_tokens == 20 and out == base_answer(pipe, edited, 4)
    same = list(session.tokens[:len(edited)])  # a prompt wholly cached still gets its last token processed
    list(session.stream_tokens(same, max_tokens=2))
    assert session.turns[-1].new_tokens == 1
    assert_cache_equals_base(session)


def test_stopping_an_answer_keeps_the_session_consistent(arch):
    """The consumer breaks off mid-answer (Ctrl-C in the REPL): the partial answer joins the conversation and the
    cache holds exactly the tokens recorded."""
    pipe = pipeline(identity=True, arch=arch)
    session = ChatSession(pipe, mode="base")
    for i, r in enumerate(session.stream(text(ids(10, 10)), max_tokens=50)):
        if i == 3:
            break
    assert session.messages[-1]["role"] == "assistant" and len(session.messages[-1]["content"].split()) == 4
    assert session.cache[0].offset == len(session.tokens)
    assert_cache_equals_base(session)
    session.send(text(ids(3, 11)), max_tokens=3)
    assert_cache_equals_base(session)


def test_save_load_round_trip_and_refusals(tmp_path, arch):
    pipe = pipeline(identity=False, arch=arch)
    session = ChatSession(pipe, mode="kvp", exact_tail=3)
    session.send(text(ids(30, 12)), max_tokens=4)
    path = tmp_path / "s.safetensors"
    session.save(path)
    loaded = ChatSession.load(pipe, path, mode="kvp", exact_tail=3)
    assert (loaded.tokens, loaded.messages, loaded.predicted_spans, loaded.exact_until) == (
        session.tokens, session.messages, session.predicted_spans, session.exact_until)
    assert [t.new_tokens for t in loaded.turns] == [t.new_tokens for t in session.turns]
    follow = text(ids(4, 13))
    assert loaded.send(follow, max_tokens=5) == session.send(follow, max_tokens=5)
    with pytest.raises(KVPredError, match="already exists"):
        session.save(path)
    before = path.read_bytes()
    with pytest.raises(KVPredError, match="end in .safetensors"):
        session.save(tmp_path / "s.bin")
    other_bundle = pipeline(identity=False)
    other_bundle.bundle.config.training = {"steps": 1}  # same shapes, another training: another bundle id
    other = Pipeline(pipe.base, other_bundle.bundle)
    with pytest.raises(KVPredError, match="predicted by another KVP bundle"):
        ChatSession.load(other, path)
    with pytest.raises(KVPredError, match="made for another model"):
        ChatSession.load(pipeline(identity=False, seed=1), path)
    session.repair()
    session.save(path, overwrite=True)
    assert ChatSession.load(other, path).pending_repair == 0  # exact K/V: any bundle may continue it
    (tmp_path / "bad.safetensors").write_bytes(before[:100])
    with pytest.raises(KVPredError, match="not a readable prompt-cache file"):
        ChatSession.load(pipe, tmp_path / "bad.safetensors")
    header = json.dumps({"__metadata__": {"format": "x"}}).encode()
    (tmp_path / "foreign.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(KVPredError):
        ChatSession.load(pipe, tmp_path / "foreign.safetensors")
    with pytest.raises(KVPredError, match="not found"):
        ChatSession.load(pipe, tmp_path / "none.safetensors")


RATES = policy.PrefillRates(base_fixed_s=0.01, base_gflops=1.0, aux_fixed_s=0.01, aux_gflops=1.0, keep_fixed_s=0.05)


def test_auto_policy_by_modelled_cost():
    pipe = pipeline(identity=False)
    pipe.prefill_rates = RATES
    n_min = policy.default_kvp_min_tokens(pipe, RATES, exact_tail=4)
    ratio = lambda n: policy.base_time(pipe, RATES, n) / policy.kvp_time(pipe, RATES, n, exact_tail=4)  # noqa: E731
    assert 4 < n_min < 400 and ratio(n_min) >= policy.KVP_MIN_SPEEDUP > ratio(n_min - 1)
    choose = lambda n, **kw: policy.choose_auto(pipe, RATES, new_tokens=n, exact_tail=4, **kw)  # noqa: E731
    assert choose(n_min - 1).mode == "base" and choose(n_min).mode == "kvp"
    assert choose(n_min, kvp_min_tokens=n_min + 1).mode == "base"
    big = choose(400)
    assert big.mode == "kvp" and big.kvp_s < big.base_s
    assert choose(400, ttft_budget=big.base_s).mode == "base" and choose(400, ttft_budget=big.base_s / 2).mode == "kvp"
    assert policy.kvp_time(pipe, RATES, 100, 50, exact_tail=4, aux_lag=40) > policy.kvp_time(
        pipe, RATES, 100, 50, exact_tail=4)  # the aux catching up costs time
    # recomputing a fraction of the predicted positions (exact_keep) costs base time, so kvp starts later
    assert policy.kvp_time(pipe, RATES, 400, exact_tail=4, exact_keep=0.25) > policy.kvp_time(pipe, RATES, 400,
                                                                                                exact_tail=4)
    assert policy.default_kvp_min_tokens(pipe, RATES, exact_tail=4, exact_keep=0.25) > n_min


def test_auto_runs_the_base_below_the_threshold():
    """Under kvp_min_tokens auto's answer is the base's, token for token (a random predictor would differ)."""
    pipe = pipeline(identity=False)
    pipe.prefill_rates = RATES
    prompt = mx.array(ids(300, 14))
    auto = list(stream_generate(pipe, prompt, mode="auto", max_tokens=6, exact_tail=4, kvp_min_tokens=301))
    assert auto[-1].mode == "base" and "--kvp-min-tokens 301" in auto[-1].reason
    assert [r.token for r in auto] == base_answer(pipe, prompt.tolist(), 6)
    kvp = list(stream_generate(pipe, prompt, mode="auto", max_tokens=6, exact_tail=4, kvp_min_tokens=300))
    assert kvp[-1].mode == "kvp" and [r.token for r in kvp] != [r.token for r in auto]


def test_prefill_rates_time_plain_kvp_whatever_the_pipeline_recomputes():
    """The probe times kvp without an exact keep, which kvp_time models on top (its recompute's FLOPs and, for a
    KVP-LP bundle, the fixed cost timed at PROBE_KEEP): a pipeline made with exact_keep (`--exact-keep`) would
    otherwise count its recompute twice, and cache those rates for every later run."""
    pipe = pipeline(identity=False)
    pipe.exact_keep = 0.5
    calls = []

    def generation(p, prompt, **kw):
        calls.append(kw)
        return generate_tokens(p, prompt, **kw)

    rates = policy.measure_prefill_rates(pipe, generation=generation, repeats=1)
    assert calls and all(kw["exact_keep"] == 0.0 and kw["max_tokens"] == 1 for kw in calls)
    assert rates.keep_fixed_s == 0.0  # this bundle's aux is not the base's first layers: no exact keep to time
    from test_facts import lp_pipeline  # a KVP-LP bundle: exact keep's fixed cost is timed too, at PROBE_KEEP

    calls.clear()
    rates = policy.measure_prefill_rates(lp_pipeline(tiny_model("llama", num_hidden_layers=6), exact_keep=0.5),
                                         generation=generation, repeats=1)
    assert {kw["exact_keep"] for kw in calls} == {0.0, policy.PROBE_KEEP} and rates.keep_fixed_s >= 0.0


def test_prefill_rates_are_measured_once_and_cached(monkeypatch):
    pipe = pipeline(identity=False)
    rates = prefill_rates(pipe)
    assert rates.base_gflops > 0 and rates.aux_gflops > 0 and rates.base_fixed_s >= 0 and rates.aux_fixed_s >= 0
    monkeypatch.setattr(policy, "measure_prefill_rates", lambda p, **kw: pytest.fail("measured twice"))
    again = pipeline(identity=False)
    assert prefill_rates(again) == rates  # read from the cache file
    assert (policy.cache_dir() / policy.RATES_FILE).is_file()


def test_exact_keep_in_a_session(arch):
    """A KVP-LP session whose pipeline recomputes every predicted position (exact_keep 1) answers each turn as a
    fresh base would; exact_keep 0.3 runs through the same path, and the session then repairs to exact K/V.
    gemma3: the recomputed rows of its sliding-window layers see their window only (60-token turns, window 8)."""
    from mlx_kvpred.auxiliary import exact_aux_layers

    base = tiny_model(arch)
    base.tokenizer = TinyChatTokenizer()
    aux, _ = make_layer_pruned_aux(base.model, base.config, [0, 1])
    lmap = layer_pruned_map([0, 1], len(base.model.layers))
    bundle = new_bundle(base, aux, aux_kind="layer_pruned", layer_map=lmap, aux_layers=[0, 1],
                        exact_layers=exact_aux_layers([0, 1], lmap))
    bundle.config.trained = True
    pipe = Pipeline(base, bundle, exact_keep=1.0)
    session = ChatSession(pipe, mode="kvp", exact_tail=4)
    for turn, seed in enumerate((21, 22)):
        answer = [r.token for r in session.stream(text(ids(60, seed)), max_tokens=5)]
        assert session.turns[-1].predicted_tokens > 0 and session.turns[-1].mode == "kvp"
        assert answer == base_answer(pipe, session.tokens[:session.turns[-1].prompt_tokens], 5), turn
    partial = ChatSession(Pipeline(base, bundle, exact_keep=0.3), mode="kvp", exact_tail=4)
    list(partial.stream(text(ids(60, 23)), max_tokens=3))
    assert partial.pending_repair > 0 and all(c.offset == len(partial.tokens) for c in partial.cache)
    partial.repair()
    exact = base_cache(partial.pipe, partial.tokens)
    assert all(mx.allclose(c.keys[..., :c.offset, :], e.keys[..., :e.offset, :], atol=1e-4).item()
               for c, e in zip(partial.cache, exact))
