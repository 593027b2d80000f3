"""Hint sets: `generate --prompts SQL --hint KIND` stores re-samples of negative prompts with a hint
in the user turn, beside (never inside) the round's groups; learn uses the right ones as rescue
sources scored under the plain prompt, or as groups of their own."""

import math

import pytest
import torch

from replay.engines.base import Completion
from replay.errors import ReplayError
from replay.hints import HINT_ANSWER, HINT_PREFIX, LADDER, Hint, hint_text, parse_hint
from replay.prompting import DEFAULT_INSTRUCTION, chat_prompt_ids
from replay.store import Store
from tests._cli import invoke, invoke_ok
from tests._tiny_model import save_tiny_model, tiny_tokenizer

SOLUTION = "4 × 5 = 20\n3 + 20 = 23\n23 - 2 = 21\n\\boxed{21}"


def test_hint_kinds_parse():
    assert parse_hint("prefix:0.5") == [Hint("prefix", 0.5)]
    assert parse_hint("answer") == [Hint("answer")]
    assert parse_hint("ladder") == [Hint("prefix", f) for f in LADDER] == [Hint("prefix", 0.25), Hint("prefix", 0.5),
                                                                            Hint("prefix", 0.75)]
    for bad in ("prefix:1", "prefix:0", "prefix:nan", "prefix:x", "prefix", "suffix:0.5", ""):
        with pytest.raises(ReplayError, match="unknown --hint"):
            parse_hint(bad)


@pytest.mark.parametrize("fraction, lines", [(0.25, 1), (0.5, 2), (0.75, 3), (0.1, 1), (0.99, 3)])
def test_a_prefix_shows_floor_f_n_lines_never_all(fraction, lines):
    """4 lines: ⌊F·4⌋ of them, at least 1 and at most 3 (the boxed answer is never given away)."""
    expected = HINT_PREFIX.format(lines="\n".join(SOLUTION.splitlines()[:lines]))
    assert hint_text(Hint("prefix", fraction), SOLUTION, "21") == expected


def test_answer_hint_and_prompts_with_nothing_to_give():
    assert hint_text(Hint("answer"), None, " 21 ") == HINT_ANSWER.format(answer="21") == "Hint: the final answer is 21."
    assert hint_text(Hint("prefix", 0.5), None, "21") is None
    assert hint_text(Hint("prefix", 0.5), "\\boxed{21}\n\n", "21") is None  # one line: it would be the answer


def test_the_hinted_prompt_is_the_plain_chat_prompt_with_the_hint_inserted():
    tokenizer = tiny_tokenizer()
    hint = "w1 w2"
    ids = chat_prompt_ids(tokenizer, "w3 w4", DEFAULT_INSTRUCTION, hint=hint)
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"w3 w4\n\n{hint}\n\n{DEFAULT_INSTRUCTION}"}],
                                         add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat_prompt_ids(tokenizer, "w3 w4", DEFAULT_INSTRUCTION) == chat_prompt_ids(
        tokenizer, "w3 w4", DEFAULT_INSTRUCTION, hint=None)  # no hint: the plain prompt, unchanged


# -- through the CLI, on a tiny model --------------------------------------------------------------------
NEGATIVE = "select prompt_id from negative_groups where round = 0"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-hints") / "tiny")


def plain_round(root, model):
    invoke_ok("generate", "--store", root, "--round", 0, "--num-prompts", 3, "-G", 2, "--max-new-tokens", 4,
              "--engine", "transformers", "--model", model, "--levels", "1", "-q")
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1, "-q")
    return Store.open(root)


def test_a_hint_set_sits_beside_the_groups_with_the_hinted_prompt_ids(tmp_path, model):
    store = plain_round(tmp_path / "store", model)
    assert store.query("SELECT count(*) AS n FROM negative_groups").to_pylist()[0]["n"] == 3  # a random model
    hinted = ("generate", "--store", store.root, "--round", 0, "--prompts", NEGATIVE, "--hint", "prefix:0.5", "-G", 2,
              "--max-new-tokens", 4, "--engine", "transformers", "--model", model, "-q")
    out = invoke_ok(*hinted)
    assert "3 groups written (6 rollouts" in out and "0 of 3 prompts solved with the hint" in out
    rows = store.query("SELECT r.prompt_id, r.sample_idx, r.prompt_token_ids, p.problem, p.solution, h.hint_kind, "
                       "h.hint_fraction FROM rollouts r JOIN prompts p USING (prompt_id) LEFT JOIN hinted_samples h "
                       "USING (round, prompt_id, sample_idx) ORDER BY r.prompt_id, r.sample_idx").to_pylist()
    tokenizer = tiny_tokenizer()
    assert len(rows) == 12
    for r in rows:
        plain = chat_prompt_ids(tokenizer, r["problem"], DEFAULT_INSTRUCTION)
        if r["sample_idx"] < 2:  # the round's own group: plain prompt, no hint
            assert r["hint_kind"] is None and r["prompt_token_ids"] == plain
        else:  # the hint set: same prompt_id, the hinted prompt's ids
            hint = hint_text(Hint("prefix", 0.5), r["solution"], "")
            assert (r["hint_kind"], r["hint_fraction"]) == ("prefix", 0.5) and hint
            assert r["prompt_token_ids"] == chat_prompt_ids(tokenizer, r["problem"], DEFAULT_INSTRUCTION, hint=hint)
            assert r["prompt_token_ids"] != plain
    invoke_ok("score", "--store", store.root, "--round", 0, "--workers", 1, "-q")
    # the groups describe the plain prompt: still 2 samples each, still negative
    assert store.query("SELECT n, kind FROM groups").to_pylist() == [{"n": 2, "kind": "negative"}] * 3
    assert "0 groups written" in invoke_ok(*hinted)  # a rerun adds nothing
    assert store.query("SELECT count(*) AS n FROM rollouts").to_pylist()[0]["n"] == 12


def test_hint_needs_a_prompt_set_and_a_known_kind(tmp_path, model):
    result = invoke("generate", "--store", tmp_path / "s", "--hint", "answer", "--model", model)
    assert result.exit_code == 1 and "--hint re-samples a prompt set" in result.output
    store = plain_round(tmp_path / "store", model)
    result = invoke("generate", "--store", store.root, "--prompts", NEGATIVE, "--hint", "prefix:2", "--model", model)
    assert result.exit_code == 1 and "unknown --hint 'prefix:2'" in result.output
    assert not (tmp_path / "s").exists()


class ScriptedEngine:
    """Answers right exactly the prompts (token ids) it is told to, wrong otherwise."""

    name, version, logprobs_mode = "scripted", "0", "processed"

    def __init__(self, right: dict[tuple[int, ...], str]):
        self.right, self.requests = right, []

    def generate(self, requests, seeds, settings):
        self.requests += [tuple(r) for r in requests]
        return [Completion([5, 3], [-0.1, -0.2], f"\\boxed{{{self.right.get(tuple(r), 'nope')}}}", "stop")
                for r in requests]


def test_the_ladder_climbs_only_for_prompts_still_unsolved(tmp_path, model):
    """Three prompts with 4-line solutions (1, 2 and 3 lines at the three tiers): a is solved at
    0.25, b at 0.5, c never: 0.25 asks a, b, c; 0.5 asks b, c; 0.75 asks c; a rerun asks nothing."""
    import json

    from stages.generate import GenerateConfig, run

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": f"w{i} w{i + 1}", "answer": str(i),
                                        "solution": f"w{i}\nw{i + 2}\nw{i + 4}\n\\boxed{{{i}}}"}) + "\n"
                            for i in (1, 2, 3)))
    root = tmp_path / "store"
    invoke_ok("generate", "--store", root, "--round", 0, "--dataset", data, "-G", 2, "--max-new-tokens", 4,
              "--engine", "transformers", "--model", model, "-q")
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1, "-q")
    store = Store.open(root)
    a, b, c = store.query("SELECT prompt_id, problem, answer, solution FROM prompts ORDER BY answer").to_pylist()
    tokenizer = tiny_tokenizer()

    def hinted(p, fraction):
        return tuple(chat_prompt_ids(tokenizer, p["problem"], DEFAULT_INSTRUCTION,
                                     hint=hint_text(Hint("prefix", fraction), p["solution"], p["answer"])))

    engine = ScriptedEngine({hinted(a, 0.25): a["answer"], hinted(b, 0.5): b["answer"]})
    cfg = GenerateConfig(round=0, model=str(model), num_samples=2, max_new_tokens=4, prompts=NEGATIVE, hint="ladder")
    record = run(str(store.root), cfg, engine=engine)
    expected = [hinted(p, 0.25) for p in (a, b, c)] + [hinted(p, 0.5) for p in (b, c)] + [hinted(c, 0.75)]
    assert sorted(set(engine.requests)) == sorted(expected) and len(engine.requests) == 2 * len(expected)
    plans = {r["stage"].rsplit("-hint-", 1)[1]: r["ids"] for r in store.query(
        "SELECT stage, list(prompt_id ORDER BY prompt_id) AS ids FROM sample_plans GROUP BY stage").to_pylist()}
    assert plans == {"prefix0.25": sorted(p["prompt_id"] for p in (a, b, c)),
                     "prefix0.5": sorted(p["prompt_id"] for p in (b, c)), "prefix0.75": [c["prompt_id"]]}
    assert record["counts"]["tiers"] == 3 and record["counts"]["unsolved"] == 1
    assert record["counts"]["solved_with_hint"] == 2
    before = len(engine.requests)
    again = run(str(store.root), cfg, engine=engine)  # a rerun draws nothing
    assert len(engine.requests) == before and again["counts"]["rollouts_written"] == 0


def test_a_hinted_rows_behaviour_weight_is_plain_over_hinted(tmp_path):
    """π_θold(y | plain) / μ(y | hinted), worked on the tiny model: with μ the hinted prompt's own
    logprobs (stored), the weight of each token is exp(logπ(y_t | plain) − logπ(y_t | hinted))."""
    from replay.core.sampling import RAW
    from replay.learn.policy import make_batch, token_logprobs
    from replay.learn.rescue import attach_behaviour
    from replay.learn.selection import LearnSample
    from tests._tiny_model import tiny_model

    tokenizer = tiny_tokenizer()
    model = tiny_model()
    plain = chat_prompt_ids(tokenizer, "w1 w2", DEFAULT_INSTRUCTION)
    hinted = chat_prompt_ids(tokenizer, "w1 w2", DEFAULT_INSTRUCTION, hint="w7 w8 w9")
    completion = tokenizer("w5 w6 answer", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        mu = token_logprobs(model, make_batch([hinted], [completion]))[0].tolist()
        under_plain = token_logprobs(model, make_batch([plain], [completion]))[0].tolist()
    row = LearnSample(0, "p", 4, 1.0, plain, completion, None, RAW, None, None, origin="hint", behaviour_round=0,
                      behaviour_logprobs=mu)
    attach_behaviour([row], model, "none", 2.0, micro_batch_size=1)
    weights = [math.exp(a - b) for a, b in zip(under_plain, mu)]
    assert row.old_logprobs == pytest.approx(under_plain, abs=1e-6)
    assert row.behaviour_stats["weight_max"] == pytest.approx(max(weights), rel=1e-5)
    assert row.behaviour_stats["sequence_weight"] == pytest.approx(
        math.exp(sum(a - b for a, b in zip(under_plain, mu)) / len(mu)), rel=1e-5)
    assert any(abs(w - 1) > 1e-3 for w in weights)  # the hint changed the model's view of the answer


@pytest.fixture(scope="module")
def hinted_store(tmp_path_factory, model):
    """Round 0 of the tiny model (3 negative groups of 2), then a prefix:0.5 hint set of 2 samples per
    prompt from a scripted engine that answers the first prompt right and the others wrong."""
    from stages.generate import GenerateConfig, run

    store = plain_round(tmp_path_factory.mktemp("hinted") / "store", model)
    first = store.query("SELECT prompt_id, problem, answer, solution FROM prompts ORDER BY prompt_id").to_pylist()[0]
    hint = hint_text(Hint("prefix", 0.5), first["solution"], first["answer"])
    right = tuple(chat_prompt_ids(tiny_tokenizer(), first["problem"], DEFAULT_INSTRUCTION, hint=hint))
    run(str(store.root), GenerateConfig(round=0, model=str(model), num_samples=2, max_new_tokens=4, prompts=NEGATIVE,
                                        hint="prefix:0.5"), engine=ScriptedEngine({right: first["answer"]}))
    invoke_ok("score", "--store", store.root, "--round", 0, "--workers", 1, "-q")
    return store, first["prompt_id"]


def test_hinted_successes_rescue_their_plain_prompts_negative_group(hinted_store, model):
    store, solved = hinted_store
    assert store.query("SELECT kind, count(*) AS n FROM groups GROUP BY kind").to_pylist() == [
        {"kind": "negative", "n": 3}]  # the hint set's right answers do not make the plain group mixed
    candidates = store.query("SELECT prompt_id, source, hint_kind, hint_fraction, age FROM rescue_candidates"
                             ).to_pylist()
    assert candidates == [{"prompt_id": solved, "source": "hint", "hint_kind": "prefix", "hint_fraction": 0.5,
                           "age": 0}] * 2
    invoke_ok("learn", "--store", store.root, "--round", 0, "--model", model, "--adapter-name", "rescued",
              "--objective", "grpo", "--rescue", "replay", "--lr", "1e-3")
    audit = store.query("SELECT prompt_id, sample_idx, origin, behaviour_round, group_kind, advantage FROM learn_audit "
                        "WHERE adapter_name = 'rescued' ORDER BY origin, prompt_id, sample_idx").to_pylist()
    hinted = [r for r in audit if r["origin"] == "hint"]
    assert [(r["prompt_id"], r["sample_idx"]) for r in hinted] == [(solved, 2), (solved, 3)]
    assert all(r["group_kind"] == "mixed" and r["advantage"] > 0 and r["behaviour_round"] == 0 for r in hinted)
    plain = [r for r in audit if r["origin"] == "group"]
    assert len(plain) == 6 and all(r["sample_idx"] < 2 for r in plain)  # hinted rows never join as members
    # replayed rows are scored under the plain prompt: their θ_old logprobs differ from the stored μ
    assert store.query("SELECT max(behaviour_weight_max) AS w FROM learn_metrics WHERE adapter_name = 'rescued'"
                       ).to_pylist()[0]["w"] != pytest.approx(1.0)


def test_hinted_as_prompt_trains_each_hint_set_as_a_group_of_its_own(hinted_store, model):
    store, solved = hinted_store
    invoke_ok("learn", "--store", store.root, "--round", 0, "--model", model, "--adapter-name", "questa",
              "--objective", "grpo", "--hinted-as", "prompt", "--lr", "1e-3")
    audit = store.query("SELECT prompt_id, sample_idx, origin, group_kind, advantage FROM learn_audit "
                        "WHERE adapter_name = 'questa' ORDER BY prompt_id, sample_idx").to_pylist()
    assert len(audit) == 12
    for r in audit:
        if r["sample_idx"] < 2:  # the plain groups: still negative, zero advantage under GRPO
            assert r["origin"] == "group" and r["group_kind"] == "negative" and r["advantage"] == 0
        else:  # the hinted groups: the solved prompt's is all right (positive), the others all wrong
            assert r["origin"] == "hint"
            assert r["group_kind"] == ("positive" if r["prompt_id"] == solved else "negative")
    manifest = store.read_manifest(0, "learn.questa")
    assert manifest["counts"]["groups"] == 6 and manifest["counts"]["replayed"] == 0


def test_hint_outcomes_in_the_view_inspect_and_report(hinted_store, tmp_path):
    store, solved = hinted_store
    rows = store.query("SELECT * FROM hint_outcomes").to_pylist()
    assert rows == [{"round": 0, "hint_kind": "prefix", "hint_fraction": 0.5, "prompts_tried": 3,
                     "solved_with_hint": 1, "sampled_next_round": 0, "solved_next_round_without_hint": 0}]
    assert "prefix" in invoke_ok("inspect", "hints", "--store", store.root)
    invoke_ok("report", "--store", store.root, "--out", tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Hint sets" in page and "solved with the hint" in page


def test_prompts_without_a_solution_are_skipped_with_a_count(tmp_path, model):
    import json

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": f"w{i} w{i + 1}", "answer": str(i)}) + "\n" for i in (1, 2)))
    root = tmp_path / "store"
    invoke_ok("generate", "--store", root, "--round", 0, "--dataset", data, "-G", 2, "--max-new-tokens", 4,
              "--engine", "transformers", "--model", model, "-q")
    invoke_ok("score", "--store", root, "--round", 0, "--workers", 1, "-q")
    out = invoke_ok("generate", "--store", root, "--round", 0, "--prompts", NEGATIVE, "--hint", "prefix:0.5", "-G", 2,
                    "--max-new-tokens", 4, "--engine", "transformers", "--model", model, "-q")
    assert "0 groups written" in out and "2 skipped: no reference solution" in out
    out = invoke_ok("generate", "--store", root, "--round", 0, "--prompts", NEGATIVE, "--hint", "answer", "-G", 2,
                    "--max-new-tokens", 4, "--engine", "transformers", "--model", model, "-q")
    assert "2 groups written" in out and "skipped" not in out  # the answer needs no solution


def test_the_rounds_own_generate_reruns_after_hint_and_rescue_sets(tmp_path, model):
    """The round's own groups are G whatever sets were added beside them: a rerun of the plain
    generate is still a no-op (it counted the sets' rows into the group size before)."""
    store = plain_round(tmp_path / "store", model)
    for extra in (["--hint", "answer"], []):  # a hint set, then plain rescue sampling
        invoke_ok("generate", "--store", store.root, "--round", 0, "--prompts", NEGATIVE, *extra, "-G", 3,
                  "--max-new-tokens", 4, "--engine", "transformers", "--model", model, "-q")
    out = invoke_ok("generate", "--store", store.root, "--round", 0, "--num-prompts", 3, "-G", 2,
                    "--max-new-tokens", 4, "--engine", "transformers", "--model", model, "--levels", "1", "-q")
    assert "0 groups written" in out and "3 already stored" in out
    result = invoke("generate", "--store", store.root, "--round", 0, "--num-prompts", 3, "-G", 4,
                    "--max-new-tokens", 4, "--engine", "transformers", "--model", model, "--levels", "1", "-q")
    assert result.exit_code == 1 and "already holds groups of 2 samples" in result.output
