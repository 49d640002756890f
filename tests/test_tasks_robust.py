"""The robust suite's generated cases (``kvcompress_vllm.tasks``) and the
default-scorer selection rule of ``benchmarks/quality.py --suite robust``.
No engine: a tokenizer stand-in, or the default model's tokenizer if prepared."""

import importlib.util
import re
from pathlib import Path

import pytest

from kvcompress_vllm import tasks

ROOT = Path(__file__).resolve().parent.parent


class WordTokenizer:
    """Stand-in tokenizer: one token per word, digit or punctuation mark."""

    def encode(self, text):
        return re.findall(r"\d|\w+|[^\w\s]", text)


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer()


def test_prose_is_deterministic_varied_and_digit_free(tok):
    a = tasks.prose(tok, 1500, tasks.random.Random(1))
    assert a == tasks.prose(tok, 1500, tasks.random.Random(1))
    assert a != tasks.prose(tok, 1500, tasks.random.Random(2))
    assert 1400 <= len(tok.encode(a)) <= 1500
    assert not any(ch.isdigit() for ch in a)
    sentences = [s for s in re.split(r"(?<=\.)\s+", a) if s]
    assert len(set(sentences)) >= 0.9 * len(sentences)  # not a repeated filler


@pytest.mark.parametrize("case", list(tasks.ROBUST_CASES))
@pytest.mark.parametrize("length", tasks.ROBUST_LENGTHS)
def test_cases_hit_their_length_and_hold_their_answer(tok, case, length):
    for seed in (0, 1, 7):
        task = tasks.ROBUST_CASES[case](tok, length, seed)
        assert task == tasks.ROBUST_CASES[case](tok, length, seed)  # deterministic
        assert 0.9 * length <= task.num_tokens <= length
        assert task.answer in task.prompt
        assert task.score(task.answer) == 1.0
        assert 0.0 < task.depth < 1.0
        if case.startswith("prose"):
            # Natural prose: the only digits are the needles'.
            digits = "".join(ch for ch in task.prompt if ch.isdigit())
            assert len(digits) <= (48 + 4 if case == "prose_copy" else 5 * 3)  # copy: + the 4 given


def test_multi_needle_question_names_one_of_several_keys(tok):
    for make in (tasks.prose_multi, tasks.filler_multi):
        task = make(tok, 1500, seed=3)
        keys = re.findall(r"pass key (?:of the \w+ )?is (\d{5})", task.prompt)
        assert len(keys) == 3 and task.answer in keys and len(set(keys)) == 3
        label = re.search(r"What is the (?:pass key of the )?(\w+)", task.prompt).group(1)
        assert label in task.prompt.split("What is")[0]


def test_copy_task_scores_the_fraction_of_digits():
    task = tasks.prose_copy(WordTokenizer(), 1500, seed=2)
    assert len(task.answer) == 44
    assert task.score(task.answer[:22] + "x") == pytest.approx(0.5)


def test_split_is_by_seed_parity_and_disjoint(tok):
    held_in = tasks.robust_suite(tok, 3, "held-in", lengths=(1500,), cases=["prose_needle", "prose_copy"])
    held_out = tasks.robust_suite(tok, 3, "held-out", lengths=(1500,), cases=["prose_needle", "prose_copy"])
    assert len(held_in) == len(held_out) == 6
    assert all(tasks.split_of(seed) == "held-in" and seed % 2 == 0 for _, _, seed, _ in held_in)
    assert all(tasks.split_of(seed) == "held-out" and seed % 2 == 1 for _, _, seed, _ in held_out)
    assert not {t.prompt for *_, t in held_in} & {t.prompt for *_, t in held_out}
    every = tasks.robust_suite(tok, 6, "all", lengths=(1500,), cases=["prose_needle", "prose_copy"])
    assert {s for _, _, s, _ in every} == {s for _, _, s, _ in held_in + held_out}


# --- the selection rule ---------------------------------------------------------

def _quality():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(split, table):
    """table: {(case, scorer, rate): [scores]} -> CSV-like rows."""
    return [{"split": split, "case": case, "length": 1500, "seed": seed, "scorer": scorer, "rate": rate,
             "score": s, "kept_fraction": rate}
            for (case, scorer, rate), scores in table.items() for seed, s in enumerate(scores)]


def test_selection_takes_the_best_worst_case_margin_on_held_in_only():
    q = _quality()
    table = {}
    for rate in (0.5, 0.25):
        # Public: kvcompress wins case a, keydiff wins case b.
        table |= {("a", "kvcompress", rate): [1, 1], ("a", "keydiff", rate): [0, 0],
                  ("b", "kvcompress", rate): [0, 0], ("b", "keydiff", rate): [1, 0]}
        for p in ("knorm", "streamingllm"):
            table |= {("a", p, rate): [0, 0], ("b", p, rate): [0, 0]}
        # Candidate x: matches the best everywhere; y: much better on a mean
        # basis would be impossible (a is at 100), but loses b by 50 points.
        table |= {("a", "metric_keydiff_union", rate): [1, 1], ("b", "metric_keydiff_union", rate): [1, 0],
                  ("a", "metric_keydiff_rank", rate): [1, 1], ("b", "metric_keydiff_rank", rate): [0, 0]}
    rows = _rows("held-in", table)
    # Held-out rows that would favour the other candidate must not matter.
    flipped = {k: ([0, 0] if k[1] == "metric_keydiff_union" else v) for k, v in table.items()}
    rows += _rows("held-out", flipped)
    best, margins = q.select_default(rows)
    assert best == "metric_keydiff_union"
    assert margins["metric_keydiff_union"][0] == 0.0  # meets the bar (>= 0)
    assert margins["metric_keydiff_rank"][0] == -0.5
    report = q.robust_report(rows)
    assert "selected on held-in: metric_keydiff_union" in report and "held-in: meets the bar" in report
    assert "held-out, n = 2 per cell" in report


def test_selection_pool_includes_the_public_scorers():
    """A public scorer that is the best in every cell is the default the rule
    picks when every combined candidate loses a cell."""
    q = _quality()
    table = {}
    for rate in (0.5, 0.25):
        for case in ("a", "b"):
            table |= {(case, "keydiff", rate): [1, 1, 1], (case, "kvcompress", rate): [1, 0, 0],
                      (case, "knorm", rate): [0, 0, 0], (case, "streamingllm", rate): [0, 0, 0]}
            for cand in q.CANDIDATES:
                table[(case, cand, rate)] = [1, 1, 0] if case == "b" else [1, 1, 1]
    best, margins = q.select_default(_rows("held-in", table))
    assert best == "keydiff" and margins["keydiff"][0] == 0.0
    assert q.select_default(_rows("held-in", table), q.CANDIDATES)[0] in q.CANDIDATES


def test_bar_test_separates_noise_from_a_real_loss():
    """Paired bootstrap per cell, Bonferroni over cells: a candidate that
    matches the best public scorer passes; one that loses a single prompt of
    13 is within noise; one that loses 10 of 13 prompts in a cell fails
    that cell (and only that cell)."""
    q = _quality()
    n = 13
    best = [1] * n
    table = {}
    for rate in (0.5, 0.25):
        for case in ("a", "b"):
            table |= {(case, "keydiff", rate): best, (case, "kvcompress", rate): [0] * n,
                      (case, "knorm", rate): [0] * n, (case, "streamingllm", rate): [0] * n,
                      (case, "metric_keydiff", rate): best,
                      (case, "metric_keydiff_rank", rate): [0] + [1] * (n - 1),
                      (case, "metric_keydiff_union", rate): [0] * 10 + [1] * 3 if (case, rate) == ("b", 0.25) else best}
    rows = _rows("held-in", table)
    same = q.bar_test(rows, "held-in", "metric_keydiff")
    assert len(same) == 4 and q.meets_bar(same) and all(p == 0 for p, _ in same.values())
    one_miss = q.bar_test(rows, "held-in", "metric_keydiff_rank")
    assert q.meets_bar(one_miss) and all(abs(p + 1 / n) < 1e-9 for p, _ in one_miss.values())
    loss = q.bar_test(rows, "held-in", "metric_keydiff_union")
    assert not q.meets_bar(loss)
    assert [cell for cell, (_, upper) in loss.items() if upper < 0] == [("b", 1500, 0.25)]
    # Unpaired rows (a scorer run on other seeds) give no cell, not a verdict.
    other = [dict(r, seed=r["seed"] + 100) if r["scorer"] == "metric_keydiff" else r for r in rows]
    assert q.bar_test(other, "held-in", "metric_keydiff") == {} and not q.meets_bar({})


# --- the long-generation suite ----------------------------------------------------

def test_word_recall_counts_words_in_order():
    ref = "the old miller carried a basket of apples near the river"
    assert tasks.word_recall(ref, ref) == 1.0
    assert tasks.word_recall(ref, ref.upper() + ' " and then more text') == 1.0  # extra words are free
    # one slipped word costs one word, not the rest
    assert tasks.word_recall(ref, ref.replace("basket", "bag")) == pytest.approx(10 / 11)
    # order matters: the reversed sentence aligns on a few words (the two "the"s)
    assert tasks.word_recall(ref, " ".join(reversed(ref.split()))) <= 3 / 11
    assert tasks.word_recall(ref, "") == 0.0
    assert tasks.word_recall("  ", "x") == 0.0 and tasks.word_recall("\n", " ") == 1.0


def test_long_suite_uses_its_own_registry(tok):
    suite = tasks.robust_suite(tok, 2, "all", lengths=(1500,), registry=tasks.LONG_CASES)
    assert [(c, s) for c, _, s, _ in suite] == [
        ("filler_continue", 100_000), ("filler_continue", 100_001),
        ("prose_continue", 101_000), ("prose_continue", 101_001)]
    assert all(t.kind == "continue" for *_, t in suite)
    # the same prompts as the robust suite's needle cases of that seed
    assert suite[2][3].prompt == tasks.prose_needle(tok, 1500, 101_000).prompt
    assert suite[0][3].prompt == tasks.ROBUST_CASES["filler_needle"](tok, 1500, 100_000).prompt
    with pytest.raises(ValueError, match="prose_copy"):
        tasks.robust_suite(tok, 1, "all", lengths=(1500,), cases=["prose_copy"], registry=tasks.LONG_CASES)


def test_long_report_compares_the_scorers_per_cell():
    q = _quality()
    table = {("prose_continue", "full", 1.0): [1.0] * 12}
    for rate in (0.5, 0.25):
        table |= {("prose_continue", "kvcompress", rate): [0.9] * 12,
                  ("prose_continue", "keydiff", rate): [0.9] * 11 + [0.2] if rate == 0.5 else [0.3] * 12}
    # overlap: the table above; score (prefix): keydiff ahead at 0.5, equal at 0.25
    prefix = {"kvcompress": {0.5: 0.1, 0.25: 0.5}, "keydiff": {0.5: 0.6, 0.25: 0.5}}
    rows = [dict(r, split=tasks.split_of(r["seed"]), overlap=r["score"],
                 score=1.0 if r["scorer"] == "full" else prefix[r["scorer"]][r["rate"]])
            for r in _rows("all", table)]
    report = q.long_report(rows)
    assert "all, n = 12 per cell" in report  # both splits reported together
    overlap_part, score_part = report.split("**score**")
    assert "**overlap**" in overlap_part
    by_rate = lambda part: {ln.split("|")[3].strip(): ln for ln in part.splitlines()
                            if ln.startswith("| prose_continue |")}
    o, p = by_rate(overlap_part), by_rate(score_part)
    assert "within noise" in o["0.5"] and "-5.8" in o["0.5"]  # one bad case in 12
    assert "keydiff worse" in o["0.25"] and "-60.0" in o["0.25"]
    assert "kvcompress worse" in p["0.5"] and "+50.0" in p["0.5"]
    assert "within noise" in p["0.25"] and "+0.0" in p["0.25"]
    # cells at other rates are compared too
    extra = [dict(r, rate=0.125) for r in rows if r["scorer"] != "full" and r["rate"] == 0.25]
    assert "| prose_continue | 1500 | 0.125 |" in q.long_report(rows + extra)
    # too few cases: no verdict, however consistent the difference
    few = [r for r in rows if r["seed"] < 3]
    assert "fewer than 5 cases" in q.long_report(few) and "worse |" not in q.long_report(few)
