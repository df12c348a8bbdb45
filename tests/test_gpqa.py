"""GPQA as simple-evals runs it: data, permutations, template, extraction, paired statistics."""

import json

import pytest

from stepquant import gpqa
from stepquant.errors import StepquantError

ROWS = [
    {"Question": f"Q{i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": f"w{i}a",
     "Incorrect Answer 2": f"w{i}b", "Incorrect Answer 3": f"w{i}c"}
    for i in range(3)
]  # fmt: skip


def write_csv(path, rows=ROWS):
    """A GPQA-format CSV of `rows`."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_permutations_follow_random0_over_repeated_rows():
    exs = gpqa.examples(ROWS, 2)
    # random.Random(0).sample(range(4), 4), six times: the rows in order, then again
    perms = [[3, 1, 0, 2], [3, 1, 2, 0], [2, 3, 0, 1], [2, 0, 3, 1], [1, 3, 0, 2], [2, 1, 0, 3]]
    assert [e.row for e in exs] == [0, 1, 2, 0, 1, 2]
    for e, p in zip(exs, perms):
        base = [ROWS[e.row]["Correct Answer"]] + [ROWS[e.row][f"Incorrect Answer {k}"] for k in (1, 2, 3)]
        assert e.choices == [base[j] for j in p]
        assert e.answer == "ABCD"[p.index(0)]
    assert [e.answer for e in exs] == ["C", "D", "C", "B", "C", "C"]


def test_prompt_is_the_simple_evals_template():
    ex = gpqa.examples(ROWS, 1)[0]
    assert gpqa.prompt(ex) == (
        "Answer the following multiple choice question. The last line of your response should be of the "
        "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step "
        "before answering.\n\nQ0?\n\nA) w0c\nB) w0a\nC) right0\nD) w0b"
    )


def test_loglik_prompt_is_lm_evals_zeroshot_template():
    row = {"Question": " Which one [1]? ", "Correct Answer": "x [title]y", "Incorrect Answer 1": "a  b",
           "Incorrect Answer 2": "c", "Incorrect Answer 3": "d"}  # fmt: skip
    ex = gpqa.examples([row], 1)[0]  # Random(0): [inc3, inc1, correct, inc2]
    assert gpqa.loglik_prompt(ex) == "What is the correct answer to this question:Which one ?\nChoices:\n(A) d\n(B) a b\n(C) x. y\n(D) c\nAnswer:"


@pytest.mark.parametrize("text, letter", [
    ("so... Answer: B", "B"), ("ANSWER:$C$", "C"), ("Answer :\tD\nAnswer: A", "D"), ("answer: b", "b"),
    ("The answer is B", None), ("<think>Answer: A</think>Answer: C", "C"), ("Answer: A</think> final: Answer: D", "D"),
    ("Answer: E", None),
])  # fmt: skip
def test_extraction_regex(text, letter):
    assert gpqa.extract(text) == letter


def test_paired_statistics_on_a_constructed_case():
    exs = gpqa.examples(ROWS, 2)
    ref = [1.0] * 6
    # quantized: question 0 right twice, question 1 once, question 2 never
    quant = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    r = gpqa.paired(exs, ref, quant)
    assert r["n"] == 3 and r["samples"] == 6
    assert r["accuracy"] == {"ref": 1.0, "quant": 0.5} and r["recovery"] == 0.5
    assert r["paired_diff"] == pytest.approx(-0.5)
    assert r["paired_se"] == pytest.approx(0.5 / 3**0.5)  # sd of (0, -0.5, -1) / sqrt(3)


def test_scoring_runs_answers_in_batches():
    exs = gpqa.examples(ROWS, 2)
    seen = []

    def answer(prompts):
        seen.append(len(prompts))
        return [f"Answer: {e.answer}" for e in exs[sum(seen[:-1]) : sum(seen)]]

    assert gpqa.score(exs, gpqa.run(exs, answer, batch=4)) == [1.0] * 6
    assert seen == [4, 2]


def test_data_files_and_their_errors(tmp_path):
    import csv

    p = tmp_path / "g.csv"
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*gpqa.COLUMNS, "Extra"])
        w.writeheader()
        for r in ROWS:
            w.writerow(r | {"Extra": "x"})
    assert gpqa.load_rows(str(p)) == ROWS
    j = tmp_path / "g.json"
    j.write_text(json.dumps(ROWS))
    assert gpqa.load_rows(str(j)) == ROWS
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"Question": "q"}]))
    with pytest.raises(StepquantError, match="row 0 lacks 'Correct Answer'"):
        gpqa.load_rows(str(bad))
    with pytest.raises(StepquantError, match="no such GPQA file"):
        gpqa.load_rows(str(tmp_path / "missing.csv"))
    with pytest.raises(StepquantError, match="variants"):
        gpqa.load_rows("hf:tiny")
