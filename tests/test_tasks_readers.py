"""Task readers and the task table: real GLUE / CoNLL / SQuAD files, the GLUE layouts not shipped
here written out in their official shapes, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bert.errors import InputError
from bert.tasks import TASKS, TsvColumns, get_task, tsv_task
from bert.tasks.readers import (
    iob1_to_iob2,
    load_squad,
    read_conll,
    read_tsv,
    split_squad_by_article,
    squad_examples,
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def tsv(*rows: tuple[str, ...]) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


# ----------------------------------------------------------------------------- real GLUE files


def test_sst2_real_files(datasets_dir: Path) -> None:
    data = get_task("sst2").reader(datasets_dir / "glue" / "SST-2")
    assert (len(data.train), len(data.evals["dev"])) == (67349, 872)
    assert data.labels == ("0", "1")
    first = data.train[0]
    assert (first.id, first.text_a, first.text_b, first.label) == (
        "0",
        "hide new secretions from the parental units ",
        None,
        "0",
    )
    assert data.evals["dev"][871].id == "871"


def test_mrpc_real_files_bom_header_and_literal_quotes(datasets_dir: Path) -> None:
    data = get_task("mrpc").reader(datasets_dir / "glue" / "MRPC")
    assert (len(data.train), len(data.evals["dev"])) == (3668, 408)
    assert data.labels == ("0", "1")
    dev0 = data.evals["dev"][0]
    # A field that opens with a quote and never closes it: quoting is off, so it stays literal text
    # and the following rows are not swallowed into it.
    assert dev0.text_b == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert dev0.label == "1"
    assert sum(ex.label == "1" for ex in data.evals["dev"]) == 279


def test_stsb_real_files_regression_with_id_column(datasets_dir: Path) -> None:
    data = get_task("stsb").reader(datasets_dir / "glue" / "STS-B")
    assert (len(data.train), len(data.evals["dev"])) == (5749, 1500)
    assert data.labels == ()
    first = data.evals["dev"][0]
    assert (first.id, first.text_a, first.text_b, first.label) == (
        "0",
        "A man with a hard hat is dancing.",
        "A man wearing a hard hat is dancing.",
        5.0,
    )
    assert all(isinstance(ex.label, float) and 0.0 <= ex.label <= 5.0 for ex in data.train)


# ----------------------------------------------------------------------------- GLUE layouts not shipped here

COLA_TRAIN = tsv(
    ("gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."),
    ("gj04", "1", "", "One more pseudo generalization and I'm giving up."),
    ("gj04", "0", "*", "They drank the pub."),
)
COLA_DEV = tsv(
    ("gj04", "1", "", "The sailors rode the breeze clear of the rocks."), ("gj04", "0", "*", "Fred the plants flat.")
)
QQP_HEADER = ("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
MNLI_TRAIN_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
    "sentence1 sentence2 label1 gold_label"
).split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def mnli_row(header: list[str], index: str, s1: str, s2: str, gold: str) -> tuple[str, ...]:
    values = {"index": index, "pairID": index + "n", "genre": "fiction", "sentence1": s1, "sentence2": s2}
    return tuple(
        values.get(name, gold if name.startswith("label") or name == "gold_label" else "( x )") for name in header
    )


def test_cola_layout_without_header(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", COLA_TRAIN)
    write(tmp_path / "dev.tsv", COLA_DEV)
    data = get_task("cola").reader(tmp_path)
    assert data.labels == ("0", "1")
    assert [(ex.id, ex.label) for ex in data.train] == [("0", "1"), ("1", "1"), ("2", "0")]
    assert data.train[0].text_a == "Our friends won't buy this analysis, let alone the next one we propose."
    assert data.evals["dev"][1].text_a == "Fred the plants flat."


def test_qqp_qnli_rte_wnli_layouts(tmp_path: Path) -> None:
    qqp = tmp_path / "QQP"
    write(
        qqp / "train.tsv",
        tsv(
            QQP_HEADER,
            ("133273", "213221", "213222", "How is life?", "What is life?", "0"),
            ("402555", "536040", "536041", "How do I get rich?", "How can I get rich?", "1"),
        ),
    )
    write(
        qqp / "dev.tsv", tsv(QQP_HEADER, ("201359", "303345", "303346", "Why are bats blind?", "Are bats blind?", "1"))
    )
    data = get_task("qqp").reader(qqp)
    assert (data.evals["dev"][0].id, data.evals["dev"][0].text_a, data.evals["dev"][0].text_b) == (
        "201359",
        "Why are bats blind?",
        "Are bats blind?",
    )

    qnli = tmp_path / "QNLI"
    header = ("index", "question", "sentence", "label")
    write(
        qnli / "train.tsv",
        tsv(header, ("0", "When?", "In 1990.", "entailment"), ("1", "Who?", "Nobody knows.", "not_entailment")),
    )
    write(qnli / "dev.tsv", tsv(header, ("0", "What?", "A dog.", "not_entailment")))
    data = get_task("qnli").reader(qnli)
    assert data.labels == ("entailment", "not_entailment")
    assert (data.evals["dev"][0].text_a, data.evals["dev"][0].text_b) == ("What?", "A dog.")

    for name, labels in (("rte", ("entailment", "not_entailment")), ("wnli", ("0", "1"))):
        folder = tmp_path / name
        header = ("index", "sentence1", "sentence2", "label")
        write(
            folder / "train.tsv",
            tsv(
                header,
                ("0", "A man sleeps.", "A person sleeps.", labels[0]),
                ("1", "It rains.", "It is sunny.", labels[1]),
            ),
        )
        write(folder / "dev.tsv", tsv(header, ("7", "Dogs bark.", "Animals make noise.", labels[0])))
        data = get_task(name).reader(folder)
        assert data.labels == labels
        assert (data.evals["dev"][0].id, data.evals["dev"][0].text_b) == ("7", "Animals make noise.")


def test_mnli_layout_matched_and_mismatched(tmp_path: Path) -> None:
    write(
        tmp_path / "train.tsv",
        tsv(
            MNLI_TRAIN_HEADER,
            mnli_row(MNLI_TRAIN_HEADER, "0", "Cream skimming has two dimensions.", "Product matters.", "neutral"),
            mnli_row(MNLI_TRAIN_HEADER, "1", "You know it.", "You lost it.", "contradiction"),
            mnli_row(MNLI_TRAIN_HEADER, "2", "One of our number.", "A member of us.", "entailment"),
        ),
    )
    write(
        tmp_path / "dev_matched.tsv",
        tsv(MNLI_DEV_HEADER, mnli_row(MNLI_DEV_HEADER, "0", "The new rights.", "Everyone likes them.", "neutral")),
    )
    write(
        tmp_path / "dev_mismatched.tsv",
        tsv(MNLI_DEV_HEADER, mnli_row(MNLI_DEV_HEADER, "0", "Your gift.", "Hmm.", "entailment")),
    )
    spec = get_task("mnli")
    data = spec.reader(tmp_path)
    assert data.labels == ("contradiction", "entailment", "neutral")
    assert set(data.evals) == {"dev_matched", "dev_mismatched"}
    assert (data.evals["dev_matched"][0].text_a, data.evals["dev_matched"][0].label) == ("The new rights.", "neutral")
    assert spec.primary_metric == "dev_matched/accuracy"


def test_user_column_mapping_by_name_and_index(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", tsv(("review", "stars", "key"), ("great", "5", "a"), ("awful", "1", "b")))
    write(tmp_path / "dev.tsv", tsv(("review", "stars", "key"), ("fine", "5", "c")))
    spec = tsv_task("reviews", "reviews", TsvColumns(text_a="review", label="stars", id="key"))
    data = spec.reader(tmp_path)
    assert (data.labels, data.evals["dev"][0].id) == (("1", "5"), "c")
    by_index = read_tsv(tmp_path / "dev.tsv", TsvColumns(text_a=0, label=1, id=2))
    assert by_index == data.evals["dev"]


# ----------------------------------------------------------------------------- bad TSV input


def test_missing_column_names_file_header_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", tsv(("sentence", "lbl"), ("good", "1")))
    with pytest.raises(InputError) as err:
        read_tsv(path, TsvColumns(text_a="sentence", label="label"))
    message = str(err.value)
    assert str(path) in message and "'label'" in message and "['sentence', 'lbl']" in message


def test_ragged_row_names_file_line_and_counts(tmp_path: Path) -> None:
    path = write(tmp_path / "train.tsv", tsv(("sentence", "label"), ("good", "1"), ("bad", "0", "extra")))
    with pytest.raises(InputError, match=r"train\.tsv:3: expected 2 tab-separated fields .*found 3"):
        read_tsv(path, TsvColumns(text_a="sentence", label="label"))


def test_unseen_dev_label_names_file_line_label_and_known_labels(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", tsv(("sentence", "label"), ("good", "1"), ("bad", "0")))
    write(tmp_path / "dev.tsv", tsv(("sentence", "label"), ("fine", "1"), ("meh", "2")))
    with pytest.raises(
        InputError, match=r"dev\.tsv:3: label '2' does not occur in the train file; known labels: \['0', '1'\]"
    ):
        get_task("sst2").reader(tmp_path)


def test_empty_dev_file_and_missing_file(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", tsv(("sentence", "label"), ("good", "1")))
    write(tmp_path / "dev.tsv", tsv(("sentence", "label")))
    with pytest.raises(InputError, match=r"dev\.tsv: no examples"):
        get_task("sst2").reader(tmp_path)
    write(tmp_path / "dev.tsv", "")
    with pytest.raises(InputError, match=r"dev\.tsv: empty file"):
        get_task("sst2").reader(tmp_path)
    (tmp_path / "dev.tsv").unlink()
    with pytest.raises(InputError, match=r"dev\.tsv: file not found"):
        get_task("sst2").reader(tmp_path)


def test_bad_regression_label_empty_label_duplicate_id(tmp_path: Path) -> None:
    header = ("index", "sentence1", "sentence2", "score")
    path = write(tmp_path / "a.tsv", tsv(header, ("0", "a", "b", "high")))
    columns = TsvColumns(text_a="sentence1", text_b="sentence2", label="score", id="index")
    with pytest.raises(InputError, match=r"a\.tsv:2: label 'high' is not a number"):
        read_tsv(path, columns, kind="regression")
    path = write(tmp_path / "b.tsv", tsv(header, ("0", "a", "b", "")))
    with pytest.raises(InputError, match=r"b\.tsv:2: empty label"):
        read_tsv(path, columns, kind="regression")
    path = write(tmp_path / "c.tsv", tsv(header, ("0", "a", "b", "1.0"), ("0", "c", "d", "2.0")))
    with pytest.raises(InputError, match=r"c\.tsv: line 3: duplicate example id '0' \(first seen at line 2\)"):
        read_tsv(path, columns, kind="regression")


def test_column_names_need_a_header() -> None:
    with pytest.raises(InputError, match="header=False"):
        TsvColumns(text_a="sentence", label=1, header=False)


# ----------------------------------------------------------------------------- CoNLL


def test_conll2003_real_files(datasets_dir: Path) -> None:
    data = get_task("conll2003").reader(datasets_dir / "conll2003")
    assert (len(data.train), len(data.evals["valid"]), len(data.evals["test"])) == (14041, 3250, 3453)
    assert data.labels == ("B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER", "O")
    first = data.train[0]
    assert first.words == ("EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", ".")
    assert first.tags == ("B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O")
    assert sum(len(ex.words) for ex in data.train) == 203621


def test_iob1_is_converted_to_iob2_on_read(tmp_path: Path) -> None:
    # IOB1 as in the original CoNLL-2003 release: I- inside and at chunk starts, B- only between
    # two adjacent chunks of one type ("Peter" and "Paul" are two persons).
    path = write(
        tmp_path / "iob1.txt",
        "-DOCSTART- O\n\nU.N. I-ORG\nofficial O\nEkeus I-PER\nheads O\nfor O\n"
        "Baghdad I-LOC\n\nPeter I-PER\nPaul B-PER\nSmith I-PER\n",
    )
    examples = read_conll(path)
    assert examples[0].tags == ("B-ORG", "O", "B-PER", "O", "O", "B-LOC")
    assert examples[1].tags == ("B-PER", "B-PER", "I-PER")
    assert iob1_to_iob2(["I-PER", "I-LOC", "B-LOC", "I-LOC", "O"]) == ("B-PER", "B-LOC", "B-LOC", "I-LOC", "O")


def test_conll_malformed_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.txt", "EU NNP B-NP B-ORG\nrejects VBZ O\n")
    with pytest.raises(InputError, match=r"bad\.txt:2: expected 4 space-separated fields .*found 3"):
        read_conll(path)
    path = write(tmp_path / "empty_tag.txt", "EU\tB-ORG\nrejects\t\n")
    with pytest.raises(InputError, match=r"empty_tag\.txt:2: empty tag"):
        read_conll(path)
    path = write(tmp_path / "not_iob.txt", "EU B-ORG\nrejects S-X\n")
    with pytest.raises(InputError, match=r"not_iob\.txt:2: tag 'S-X' is not an IOB tag"):
        read_conll(path)
    path = write(tmp_path / "unseen.txt", "EU B-ORG\n\nParis B-LOC\n")
    with pytest.raises(InputError, match=r"unseen\.txt:3: tag 'B-LOC' does not occur in the train file"):
        read_conll(path, known_labels=("B-ORG", "O"))


# ----------------------------------------------------------------------------- SQuAD


def test_squad_dev_split_by_article(datasets_dir: Path) -> None:
    raw = load_squad(datasets_dir / "squad_v1.1" / "dev-v1.1.json")
    train_json, eval_json = split_squad_by_article(raw, n_train_articles=24)
    assert (len(train_json["data"]), len(eval_json["data"]), train_json["version"]) == (24, 24, "1.1")
    data = get_task("squad_v1_dev_split").reader(datasets_dir / "squad_v1.1")
    assert (len(data.train), len(data.evals["dev"])) == (5696, 4874)
    assert data.skipped == {"train": 0, "dev": 0}
    assert not {ex.context for ex in data.train} & {ex.context for ex in data.evals["dev"]}
    first = data.train[0]
    assert (first.id, first.title, first.answers[0].text, first.answers[0].start) == (
        "56be4db0acb8001400a502ec",
        "Super_Bowl_50",
        "Denver Broncos",
        177,
    )


def squad_json(qas: list[dict], context: str = "The cat sat on the mat in Paris.") -> dict:
    return {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": context, "qas": qas}]}]}


def test_squad_misaligned_answers_are_counted_and_skipped() -> None:
    data = squad_json(
        [
            {"id": "a", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 26}]},
            {"id": "b", "question": "What?", "answers": [{"text": "mat", "answer_start": 3}]},
            {
                "id": "c",
                "question": "Who?",
                "answers": [{"text": "cat", "answer_start": 4}, {"text": "The cat", "answer_start": 1}],
            },
        ]
    )
    examples, skipped = squad_examples(data, "x.json")
    assert [ex.id for ex in examples] == ["a"]
    assert skipped == 2


def test_squad_v2_impossible_and_plausible_answers() -> None:
    data = squad_json(
        [
            {
                "id": "a",
                "question": "Where?",
                "answers": [{"text": "Paris", "answer_start": 26}],
                "is_impossible": False,
            },
            {
                "id": "b",
                "question": "When?",
                "answers": [],
                "is_impossible": True,
                "plausible_answers": [{"text": "mat", "answer_start": 19}],
            },
        ]
    )
    examples, skipped = squad_examples(data, "v2.json")
    assert skipped == 0
    assert examples[1].is_impossible and examples[1].answers == ()
    assert examples[1].plausible_answers[0].text == "mat"


def test_squad_structural_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"v2\.json: question b: no answers and not marked is_impossible"):
        squad_examples(squad_json([{"id": "b", "question": "When?", "answers": []}]), "v2.json")
    with pytest.raises(InputError, match=r"v2\.json: question b: is_impossible but has answers"):
        squad_examples(
            squad_json(
                [
                    {
                        "id": "b",
                        "question": "When?",
                        "is_impossible": True,
                        "answers": [{"text": "mat", "answer_start": 19}],
                    }
                ]
            ),
            "v2.json",
        )
    path = write(tmp_path / "not_squad.json", json.dumps({"articles": []}))
    with pytest.raises(InputError, match=r"not_squad\.json: expected a SQuAD JSON object"):
        load_squad(path)
    with pytest.raises(InputError, match=r"train-v1\.1\.json: file not found"):
        get_task("squad_v1").reader(tmp_path)


# ----------------------------------------------------------------------------- the table


def test_table_rows_and_unknown_task() -> None:
    assert set(TASKS) == {
        "cola",
        "sst2",
        "mrpc",
        "stsb",
        "qqp",
        "mnli",
        "qnli",
        "rte",
        "wnli",
        "conll2003",
        "squad_v1",
        "squad_v1_dev_split",
        "squad_v2",
    }
    kinds = {name: spec.kind for name, spec in TASKS.items()}
    assert (
        kinds["stsb"] == "regression" and kinds["conll2003"] == "token_classification" and kinds["squad_v2"] == "span"
    )
    assert get_task("stsb").num_outputs(()) == 1 and get_task("squad_v1").num_outputs(()) == 2
    assert get_task("mnli").num_outputs(("contradiction", "entailment", "neutral")) == 3
    with pytest.raises(InputError, match=r"unknown task 'sst-3'; known tasks: cola, sst2, mrpc"):
        get_task("sst-3")
