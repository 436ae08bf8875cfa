"""The task table's rows by name, and a TSV dataset of your own described by its task name (`tsv:...`)."""

from __future__ import annotations

import pytest

from bert.errors import InputError
from bert.tasks import get_task

MRPC_AS_TSV = "tsv:text=#1 String,pair=#2 String,label=Quality,metric=f1"


def test_a_tsv_name_with_mrpc_columns_reads_and_scores_like_the_mrpc_row(datasets_dir):
    mrpc, mine = get_task("mrpc"), get_task(MRPC_AS_TSV)
    ours, theirs = mine.reader(datasets_dir / "glue" / "MRPC"), mrpc.reader(datasets_dir / "glue" / "MRPC")
    assert ours.train == theirs.train and ours.evals == theirs.evals and ours.labels == theirs.labels
    assert (mine.kind, mine.text_fields, mine.primary_metric, mine.positive_label) == (
        "classification", ("#1 String", "#2 String"), "dev/f1", "1")
    dev = theirs.evals["dev"]
    guesses = ["1" if len(ex.text_a) > len(ex.text_b) else "0" for ex in dev]
    assert mine.score("dev", guesses, dev) == mrpc.score("dev", guesses, dev)
    assert get_task(MRPC_AS_TSV) == get_task(MRPC_AS_TSV)  # the same name is the same row everywhere


def test_tsv_defaults_indices_regression_and_several_eval_files():
    spec = get_task("tsv:text=0,label=1,header=no")
    assert (spec.kind, spec.primary_metric, spec.positive_label, spec.max_seq_length) == (
        "classification", "dev/accuracy", None, 128)
    spec = get_task("tsv:text=s1,pair=s2,label=score,kind=regression,eval=a.tsv+b.tsv")
    assert (spec.kind, spec.primary_metric, spec.num_outputs(())) == ("regression", "a/spearman", 1)
    spec = get_task("tsv:text=review,label=polarity,metric=f1,positive=pos")
    assert spec.positive_label == "pos" and spec.primary_metric == "dev/f1"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tsv:text=a", "no label=COL"),
        ("tsv:label=a", "no text=COL"),
        ("tsv:text=a,label", "'label' is not KEY=VALUE"),
        ("tsv:text=a,label=b,colour=red", "unknown key 'colour'; known keys: text, pair, label"),
        ("tsv:text=a,label=b,text=c", "'text' given twice"),
        ("tsv:text=a,label=b,metric=auc", "unknown metric 'auc'; known: accuracy, f1, matthews, correlation"),
        ("tsv:text=a,label=b,kind=regression,metric=f1", "metric f1 scores classification labels, but kind=regression"),
        ("tsv:text=a,label=b,kind=ordinal", "kind must be classification or regression"),
        ("tsv:text=a,label=b,positive=x", "positive=LABEL only goes with metric=f1"),
        ("tsv:text=a,label=1,header=no", "header name 'a', but header=False: use a column index"),
        ("tsv:text=a,label=b,header=maybe", "header must be yes or no"),
        ("tsv:text=a,label=b,eval=x/dev.tsv+y/dev.tsv", "distinct stems"),
    ],
)
def test_bad_tsv_task_names(name, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        get_task(name)


def test_unknown_task_lists_the_table_and_the_tsv_form():
    with pytest.raises(InputError, match=r"unknown task 'glue'; known tasks: cola, sst2, mrpc, .*tsv:text=COL"):
        get_task("glue")
