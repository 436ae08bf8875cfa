"""Hugging Face interop both ways: what `bertflow convert --to-hf` writes loads in `transformers` with our ids and outputs.

Tokenizers: a SentencePiece model (unigram and BPE) trained by bertflow on a real Wikipedia file, and
the real `bert-base-uncased` WordPiece vocabulary. Models: a tiny BERT pretrained by bertflow for a few
MLM steps on real Wikipedia text, and the real MiniLM with a named-label classifier head. References:
`transformers.AutoTokenizer`, `AutoModelForMaskedLM`, `AutoModelForSequenceClassification`, `pipeline`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
from pathlib import Path

import pytest
import torch

from pipelines.cli import main

KINDS = ("unigram", "bpe", "wordpiece")


def wiki_lines(wiki_dir: Path, name: str, n: int) -> list[str]:
    with gzip.open(wiki_dir / name, "rt", encoding="utf-8") as f:
        text = f.read()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("<")][:n]


def convert_to_hf(src: Path, out: Path) -> Path:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["convert", "--to-hf", str(src), "--out", str(out)]) == 0, err.getvalue()
    return out


@pytest.fixture(scope="module", params=KINDS)
def tokenizer_dir(request, wiki_dir, vocab_txt, tmp_path_factory) -> Path:
    from bert.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("tok") / request.param
    if request.param == "wordpiece":
        Tokenizer.from_vocab_file(vocab_txt).save(out)
    else:
        Tokenizer.train_sentencepiece([wiki_dir / "wiki_00.gz"], 1000, out, request.param, sample_sentences=5000,
                                      num_threads=2)
    return out


@pytest.fixture(scope="module")
def pretrained(tokenizer_dir, wiki_dir, tmp_path_factory) -> Path:
    """A tiny BERT pretrained by bertflow's model for a few MLM steps on real text, saved as our checkpoint."""
    from bert.checkpoint import save_pretrained
    from bert.config import preset
    from bert.model import BertForPreTraining
    from bert.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = BertForPreTraining(preset("tiny", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lines = [line for line in wiki_lines(wiki_dir, "wiki_00.gz", 200) if len(line.split()) >= 8][:64]
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        batch = [tokenizer.encode(text, max_length=64, truncation="longest_first").ids for text in lines[step::4]]
        length = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_id] * (length - len(ids)) for ids in batch])
        positions = torch.stack([1 + torch.randperm(len(ids) - 2, generator=generator)[:3] for ids in batch])
        targets = input_ids.gather(1, positions)
        input_ids.scatter_(1, positions, tokenizer.mask_id)
        out = model(input_ids, torch.zeros_like(input_ids), (input_ids != tokenizer.pad_id).long(),
                    masked_lm_positions=positions, masked_lm_ids=targets, next_sentence_label=torch.zeros(len(batch)).long())
        out.mlm_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return save_pretrained(model, tmp_path_factory.mktemp("ck") / "pretrained", tokenizer_dir=tokenizer_dir)


def test_autotokenizer_gives_our_ids_on_real_text(pretrained, wiki_dir, tmp_path):
    from transformers import AutoTokenizer

    from bert.tokenizer import Tokenizer

    hf_dir = convert_to_hf(pretrained, tmp_path / "hf")
    ours, theirs = Tokenizer.load(hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    assert ours.fingerprint() == Tokenizer.load(pretrained).fingerprint()  # our loader still reads the export
    lines = wiki_lines(wiki_dir, "wiki_01.gz", 400)  # not the file the SentencePiece models were trained on
    for a, b in zip(lines[::2], lines[1::2]):
        pair, encoded = ours.encode(a, b), theirs(a, b)
        assert encoded["input_ids"] == pair.ids and encoded["token_type_ids"] == pair.token_type_ids, a
        assert theirs(a)["input_ids"] == ours.encode(a).ids
    assert theirs.mask_token == "[MASK]" and theirs.mask_token_id == ours.mask_id and theirs.pad_token_id == ours.pad_id


def test_masked_lm_and_fill_mask_load_the_export(pretrained, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from bert.checkpoint import from_pretrained
    from bert.tokenizer import Tokenizer

    hf_dir = convert_to_hf(pretrained, tmp_path / "hf")
    tokenizer = Tokenizer.load(pretrained)
    ids = tokenizer.encode("The city lies on the bank of the river.").ids
    ids[3] = tokenizer.mask_id
    input_ids = torch.tensor([ids])
    ours = from_pretrained(pretrained).eval()
    hf = AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():  # MLM logits at every position: ours equal theirs
        expected = ours(input_ids, torch.zeros_like(input_ids), torch.ones_like(input_ids),
                        masked_lm_positions=torch.arange(len(ids))[None]).mlm_logits
        logits = hf(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids)).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)

    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    text = "The city lies on the [MASK] of the river."  # transformers reads "[MASK]" in text as the mask token
    answers = pipeline("fill-mask", model=hf, tokenizer=hf_tokenizer, top_k=5)(text)
    assert len(answers) == 5 and all(0 <= a["score"] <= 1 for a in answers)
    assert sum(a["score"] for a in answers) <= 1 + 1e-6
    encoded = hf_tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        scores = hf(**encoded).logits[0, encoded["input_ids"][0].tolist().index(tokenizer.mask_id)]
    assert answers[0]["token"] == int(scores.argmax())
    assert answers[0]["token_str"].strip() == tokenizer.decode([answers[0]["token"]]).strip()


def test_finetuned_classifier_loads_with_named_labels(minilm_dir, datasets_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bert.checkpoint import from_pretrained, save_pretrained
    from bert.inference import Predictor, write_task_file

    torch.manual_seed(0)
    model = from_pretrained(minilm_dir, head="sequence_classification", labels=["negative", "positive"])
    checkpoint = save_pretrained(model, tmp_path / "sst2", tokenizer_dir=minilm_dir)
    write_task_file(checkpoint, "sst2", 128)
    hf_dir = convert_to_hf(checkpoint, tmp_path / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    assert hf.config.id2label == {0: "negative", 1: "positive"}
    assert hf.config.label2id == {"negative": 0, "positive": 1}
    sentences = [line.rsplit("\t", 1)[0] for line in
                 (datasets_dir / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:17]]
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    predictor = Predictor(checkpoint)
    for sentence, record in zip(sentences, predictor.predict_records([{"text": s} for s in sentences])):
        encoded = tokenizer(sentence, return_tensors="pt")
        assert encoded["input_ids"][0].tolist() == predictor.tokenizer.encode(sentence).ids
        with torch.no_grad():
            probabilities = hf(**encoded).logits.softmax(-1)[0]
        assert hf.config.id2label[int(probabilities.argmax())] == record["label"]
        expected = [record["probabilities"][label] for label in ("negative", "positive")]
        assert probabilities.tolist() == pytest.approx(expected, abs=1e-5)
