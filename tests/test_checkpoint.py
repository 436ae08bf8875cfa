"""Checkpoint I/O: configs, presets, bad input, the convert CLI."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import bert
from bert.config import BertConfig, preset
from bert.errors import CheckpointError, InputError
from bert.model import BertForPreTraining, BertModel, count_parameters
from pipelines.cli import main as cli

SMALL = dict(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "name,layers,hidden", [("tiny", 2, 128), ("mini", 4, 256), ("small", 4, 512), ("medium", 8, 512), ("base", 12, 768), ("large", 24, 1024)]
)
def test_presets_have_published_shapes(name, layers, hidden):
    c = preset(name)
    assert (c.num_hidden_layers, c.hidden_size) == (layers, hidden)
    assert c.num_attention_heads == hidden // 64 and c.intermediate_size == 4 * hidden
    assert c.vocab_size == 30522


def test_parameter_counts_match_transformers_and_published_figures():
    """Published: BERT-base 110M, BERT-large 340M (the paper rounds to two significant figures)."""
    counts = {}
    for name in ("base", "large"):
        c = preset(name)
        ours = count_parameters(BertForPreTraining(c))
        ref = transformers.BertForPreTraining(
            transformers.BertConfig(
                hidden_size=c.hidden_size,
                num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads,
                intermediate_size=c.intermediate_size,
            )
        )
        assert ours == sum(p.numel() for p in ref.parameters())
        counts[name] = ours
    assert abs(counts["base"] - 110e6) / 110e6 < 0.01  # 110.1M
    assert float(f"{counts['large']:.2g}") == 340e6  # 336.2M; within 1.2% of 340M
    assert abs(counts["large"] - 340e6) / 340e6 < 0.012


def test_config_validation():
    with pytest.raises(InputError, match="divisible"):
        BertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(InputError, match="positive"):
        BertConfig(num_hidden_layers=0)
    with pytest.raises(InputError, match="hidden_act"):
        BertConfig(hidden_act="relu")
    with pytest.raises(InputError, match="unknown model preset 'huge'.*tiny"):
        preset("huge")
    with pytest.raises(Exception):
        BertConfig().hidden_size = 3  # frozen


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(**SMALL))
    return bert.save_pretrained(model, tmp_path / "ckpt")


def test_missing_config_json(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        bert.from_pretrained(saved)


def test_config_with_hidden_not_divisible_by_heads(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model"]["num_attention_heads"] = 3
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"config\.json.*hidden_size \(32\) must be divisible by num_attention_heads \(3\)"):
        bert.from_pretrained(saved)


def test_missing_tensor(saved):
    state = load_file(saved / "model.safetensors")
    del state["bert.encoder.layer.0.attention.self.key.weight"]
    save_file(state, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor bert\.encoder\.layer\.0\.attention\.self\.key\.weight is missing"):
        bert.from_pretrained(saved)


def test_misshaped_tensor(saved):
    state = load_file(saved / "model.safetensors")
    state["bert.pooler.dense.weight"] = torch.zeros(32, 31)
    save_file(state, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor bert\.pooler\.dense\.weight has shape \(32, 31\), expected \(32, 32\)"):
        bert.from_pretrained(saved)


def test_truncated_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        bert.from_pretrained(saved)


class _Exploit:
    """Pickles to a call that would create a file if the pickle were executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_not_executed(tmp_path):
    hf = transformers.BertModel(transformers.BertConfig(**SMALL))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(tmp_path / "hf" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.word_embeddings.weight": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused"):
        bert.from_pretrained(tmp_path / "hf")
    assert not marker.exists()


def test_tensor_only_pickle_is_accepted(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**SMALL))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    ours = bert.from_pretrained(tmp_path / "hf")
    assert isinstance(ours, BertModel)
    assert torch.equal(ours.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)


def test_directory_that_is_not_a_bert_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a BERT checkpoint directory"):
        bert.from_pretrained(tmp_path / "empty")
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(CheckpointError, match="model_type is 'gpt2', expected 'bert'"):
        bert.from_pretrained(gpt)
    with pytest.raises(CheckpointError, match="not found"):
        bert.from_pretrained(tmp_path / "nope")


def test_legacy_names_and_untied_decoder(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(transformers.BertConfig(**SMALL))
    hf.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    legacy["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    save_file(legacy, tmp_path / "hf" / "model.safetensors")
    model = bert.from_pretrained(tmp_path / "hf")
    assert torch.equal(model.bert.embeddings.LayerNorm.weight, state["bert.embeddings.LayerNorm.weight"])
    legacy["cls.predictions.decoder.weight"] = legacy["cls.predictions.decoder.weight"] + 1
    save_file(legacy, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="decoder.weight differs"):
        bert.from_pretrained(tmp_path / "hf")


def test_classifier_with_other_label_count_is_reinitialised_only_when_asked(tmp_path):
    torch.manual_seed(0)
    model = bert.checkpoint.build_model(BertConfig(**SMALL), "sequence_classification", 3)
    model.labels = ("a", "b", "c")
    bert.save_pretrained(model, tmp_path / "c")
    assert bert.from_pretrained(tmp_path / "c").labels == ("a", "b", "c")
    two = bert.from_pretrained(tmp_path / "c", head="sequence_classification", labels=["x", "y"])
    assert two.load_report.initialised == ["classifier."] and two.labels == ("x", "y")
    with pytest.raises(CheckpointError, match="no 'token_classification' labels"):
        bert.from_pretrained(tmp_path / "c", head="token_classification")


# ----------------------------------------------------------------------------- CLI


def test_convert_cli_round_trip_on_real_checkpoint(minilm_dir, tmp_path, capsys):
    assert cli(["convert", "--from-hf", str(minilm_dir), "--out", str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "vocab.txt").is_file()  # the tokenizer travels with the checkpoint
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["bertflow"]["head"] is None
    assert cli(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 0
    model, info = transformers.BertModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = transformers.BertModel.from_pretrained(minilm_dir)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # wrong direction: a clear one-line error, exit status 2, nothing written
    assert cli(["convert", "--to-hf", str(minilm_dir), "--out", str(tmp_path / "x")]) == 2
    assert "expects a bertflow checkpoint dir" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_save_is_atomic(tmp_path):
    """A failing save leaves no directory under the final name."""
    model = BertModel(BertConfig(**SMALL))
    model.config = "not a config"  # breaks serialisation half-way
    with pytest.raises(AttributeError):
        bert.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_pretraining_head_is_initialised_as_bert_does(minilm_dir):
    """MiniLM (a sentence-embedding checkpoint) has no MLM or NSP head: both are initialised as BERT
    initialises them, from `init_seed`, the decoder tied to the word embeddings, the encoder loaded."""
    before = torch.random.get_rng_state()
    model = bert.from_pretrained(minilm_dir, head="pretraining", init_seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    assert model.load_report.initialised == ["cls.predictions.", "cls.seq_relationship."]
    assert "bert." in model.load_report.loaded
    std = model.config.initializer_range
    head = model.cls.predictions
    assert abs(head.transform.dense.weight.std().item() - std) < 0.1 * std
    assert abs(model.cls.seq_relationship.weight.std().item() - std) < 0.2 * std
    for zero in (head.transform.dense.bias, head.transform.LayerNorm.bias, head.bias, model.cls.seq_relationship.bias):
        assert torch.count_nonzero(zero) == 0
    assert torch.equal(head.transform.LayerNorm.weight, torch.ones_like(head.transform.LayerNorm.weight))
    again = bert.from_pretrained(minilm_dir, head="pretraining", init_seed=7)
    other = bert.from_pretrained(minilm_dir, head="pretraining", init_seed=8)
    assert torch.equal(again.cls.predictions.transform.dense.weight, head.transform.dense.weight)
    assert not torch.equal(other.cls.predictions.transform.dense.weight, head.transform.dense.weight)
    # the encoder is the checkpoint's (against transformers), and the decoder is the word-embedding matrix
    ids = torch.tensor([[101, 7592, 103, 2088, 102]])
    ref = transformers.BertModel.from_pretrained(minilm_dir).eval()
    model.eval()
    with torch.no_grad():
        out = model(ids, masked_lm_positions=torch.tensor([[2]]))
        hidden = ref(ids).last_hidden_state
        torch.testing.assert_close(out.sequence_output, hidden, atol=1e-4, rtol=1e-4)
        expected = head.transform(hidden[:, [2]]) @ ref.embeddings.word_embeddings.weight.T + head.bias
        torch.testing.assert_close(out.mlm_logits, expected, atol=1e-4, rtol=1e-4)


def test_tokenizer_mismatch_names_vocabulary_and_casing(minilm_dir, vocab_txt, tmp_path):
    from bert.checkpoint import tokenizer_mismatch
    from bert.tokenizer import Tokenizer

    Tokenizer.load(minilm_dir).save(tmp_path / "same")
    assert tokenizer_mismatch(minilm_dir, tmp_path / "same") is None
    Tokenizer.from_vocab_file(minilm_dir / "vocab.txt", lowercase=False).save(tmp_path / "cased")
    assert "cased" in tokenizer_mismatch(minilm_dir, tmp_path / "cased")
    lines = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "vocab.txt").write_text("\n".join(lines[:-1] + ["zzzz"]) + "\n", encoding="utf-8")
    Tokenizer.from_vocab_file(tmp_path / "vocab.txt").save(tmp_path / "other")
    assert "another vocabulary" in tokenizer_mismatch(minilm_dir, tmp_path / "other")
