"""Parity of our model and checkpoint I/O with Hugging Face `transformers` (the reference).

transformers is imported only here, in tests; bert/ and pipelines/ never import it.
"""

from __future__ import annotations

import csv

import pytest
import torch
import transformers

import bert
from bert.checkpoint import read_checkpoint_info
from bert.model import BertForPreTraining, BertModel

ATOL = 1e-5

SMALL = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=64,
)

# our head name -> (transformers class, extra config kwargs)
HF_HEADS = {
    "pretraining": (transformers.BertForPreTraining, {}),
    "sequence_classification": (transformers.BertForSequenceClassification, {"num_labels": 3}),
    "regression": (transformers.BertForSequenceClassification, {"num_labels": 1}),
    "token_classification": (transformers.BertForTokenClassification, {"num_labels": 5}),
    "question_answering": (transformers.BertForQuestionAnswering, {}),
}


def mixed_batch(vocab_size: int, seed: int = 0):
    """A batch with padding, both segment ids and sequences of different lengths."""
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 23
    lengths = [23, 17, 9, 4]
    ids = torch.randint(5, vocab_size, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    types = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        types[i, n // 2 : n] = 1
    ids[mask == 0] = 0
    positions = torch.stack([torch.randperm(n, generator=g)[:3] for n in lengths])  # (B, 3) inside each sequence
    return ids, types, mask, positions


def hf_model(kind: str, seed: int = 0):
    cls, extra = HF_HEADS[kind]
    torch.manual_seed(seed)
    return cls(transformers.BertConfig(**SMALL, **extra)).eval()


def our_outputs(model, ids, types, mask, positions):
    with torch.no_grad():
        if isinstance(model, BertForPreTraining):
            return model(ids, types, mask, masked_lm_positions=positions)
        return model(ids, types, mask)


def compare(kind, ours, hf, batch):
    ids, types, mask, positions = batch
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
    out = our_outputs(ours, ids, types, mask, positions)
    torch.testing.assert_close(out.sequence_output, ref.hidden_states[-1], atol=ATOL, rtol=0)
    if kind == "pretraining":
        V = SMALL["vocab_size"]
        ref_mlm = torch.gather(ref.prediction_logits, 1, positions[..., None].expand(-1, -1, V))
        torch.testing.assert_close(out.mlm_logits, ref_mlm, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.nsp_logits, ref.seq_relationship_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.pooled_output, torch.tanh(hf.bert.pooler.dense(ref.hidden_states[-1][:, 0])), atol=ATOL, rtol=0)
    elif kind == "question_answering":
        torch.testing.assert_close(out.start_logits, ref.start_logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(out.end_logits, ref.end_logits, atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", list(HF_HEADS))
def test_import_matches_transformers(kind, tmp_path):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours = bert.from_pretrained(tmp_path / "hf").eval()
    assert ours.load_report.initialised == []
    assert ours.load_report.unused == []
    compare(kind, ours, hf, mixed_batch(SMALL["vocab_size"]))


def test_span_loss_matches_transformers_without_padding_and_ignores_padding(tmp_path):
    """The span loss equals the reference's on unpadded features, and padding added after a feature does not
    change its loss (the reference's softmax also covers padded positions, so its loss depends on batch-mates)."""
    hf = hf_model("question_answering", seed=4)
    ids, types, mask, _ = mixed_batch(SMALL["vocab_size"], seed=5)
    starts, ends = torch.tensor([3, 2, 1, 0]), torch.tensor([5, 9, 4, 0])
    hf.save_pretrained(tmp_path / "hf")
    ours = bert.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        for i, n in enumerate(mask.sum(1).tolist()):  # each feature alone, unpadded: the reference's loss
            alone = dict(input_ids=ids[i : i + 1, :n], token_type_ids=types[i : i + 1, :n],
                         attention_mask=mask[i : i + 1, :n], start_positions=starts[i : i + 1],
                         end_positions=ends[i : i + 1])
            ref = hf(**alone).loss
            torch.testing.assert_close(ours(**alone).loss, ref, atol=ATOL, rtol=0)
            padded = dict(alone)
            for key in ("input_ids", "token_type_ids", "attention_mask"):
                padded[key] = torch.nn.functional.pad(alone[key], (0, 11))
            torch.testing.assert_close(ours(**padded).loss, ref, atol=ATOL, rtol=0)
            assert not torch.allclose(hf(**padded).loss, ref, atol=ATOL, rtol=0)  # the reference's does change


@pytest.mark.parametrize("kind", list(HF_HEADS))
def test_export_loads_into_transformers_without_warnings(kind, tmp_path):
    hf = hf_model(kind, seed=1)
    hf.save_pretrained(tmp_path / "hf")
    ours = bert.from_pretrained(tmp_path / "hf")
    bert.save_pretrained(ours, tmp_path / "exported", hf=True)
    cls, _ = HF_HEADS[kind]
    back, info = cls.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert info["missing_keys"] == [] or info["missing_keys"] == set()
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    back.eval()
    ids, types, mask, _ = mixed_batch(SMALL["vocab_size"], seed=3)
    with torch.no_grad():
        a = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
        b = back(input_ids=ids, token_type_ids=types, attention_mask=mask)
    for name in a.keys():
        assert torch.equal(a[name], b[name]), name  # same weights, same code: identical


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", ["pretraining", "sequence_classification", "token_classification", "question_answering"])
def test_round_trips_are_bit_exact(kind, tmp_path):
    torch.manual_seed(7)
    config = bert.BertConfig(**SMALL)
    head_kwargs = {"sequence_classification": 3, "token_classification": 4}
    model = bert.checkpoint.build_model(config, kind, head_kwargs.get(kind))
    if kind in head_kwargs:
        model.labels = tuple(f"L{i}" for i in range(head_kwargs[kind]))
    # ours -> ours
    bert.save_pretrained(model, tmp_path / "ours")
    again = bert.from_pretrained(tmp_path / "ours")
    state_equal(model, again)
    assert getattr(again, "labels", None) == getattr(model, "labels", None)
    # ours -> HF -> ours
    bert.save_pretrained(model, tmp_path / "hf", hf=True)
    assert read_checkpoint_info(tmp_path / "hf").kind == "huggingface"
    via_hf = bert.from_pretrained(tmp_path / "hf")
    state_equal(model, via_hf)
    assert getattr(via_hf, "labels", None) == getattr(model, "labels", None)


def test_encoder_only_and_new_head_from_pretraining_checkpoint(tmp_path):
    hf = hf_model("pretraining", seed=2)
    hf.save_pretrained(tmp_path / "hf")
    encoder = bert.from_pretrained(tmp_path / "hf", head=None)
    assert isinstance(encoder, BertModel)
    assert encoder.load_report.unused == ["cls.predictions.", "cls.seq_relationship."]
    clf = bert.from_pretrained(tmp_path / "hf", head="sequence_classification", num_labels=2)
    assert clf.load_report.initialised == ["classifier."]
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, clf.bert.state_dict()[k]), k


def mrpc_dev_pairs(datasets_dir):
    path = datasets_dir / "glue" / "MRPC" / "dev.tsv"
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0]
    a, b = header.index("#1 String"), header.index("#2 String")
    return [(r[a], r[b]) for r in rows[1:]]


def test_real_checkpoint_matches_transformers_on_mrpc_dev(minilm_dir, datasets_dir):
    """MiniLM-L6-H384 (a real pretrained BERT) on all 408 real MRPC dev pairs."""
    pairs = mrpc_dev_pairs(datasets_dir)
    assert len(pairs) == 408
    # Tokenized by the reference tokenizer: this test is about the model, not the tokenizer.
    tok = transformers.BertTokenizerFast.from_pretrained(minilm_dir)
    ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
    ours = bert.from_pretrained(minilm_dir, head=None).eval()
    worst = 0.0
    for i in range(0, len(pairs), 32):
        chunk = pairs[i : i + 32]
        enc = tok([p[0] for p in chunk], [p[1] for p in chunk], padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = ref(**enc).last_hidden_state
            got = ours(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]).sequence_output
        keep = enc["attention_mask"].bool()
        worst = max(worst, (got - expected)[keep].abs().max().item())
    assert worst < ATOL, worst
