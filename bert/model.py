"""BERT (Devlin et al., 2019) in one file, in dependency order:

    embeddings -> self-attention -> layer -> encoder -> pooler -> heads -> task models

Module and parameter names are those of the original checkpoints as the Hugging Face
conversion spells them (`bert.encoder.layer.3.attention.self.query.weight`,
`cls.predictions.transform.dense.weight`, ...), so checkpoint I/O is a key-for-key copy.

Shape legend
    B  batch size              T  sequence length (tokens)
    D  hidden size             N  attention heads        Dh  head size = D / N
    I  intermediate size       V  vocabulary size        P  masked positions per sequence
    C  number of labels

Deviations from the paper / the original TensorFlow code, all deliberate:
  * Attention uses `torch.nn.functional.scaled_dot_product_attention` (a fused kernel where the
    hardware has one); numerically it is softmax(QK^T / sqrt(Dh) + mask) V as in the paper. On
    CPU in training with attention dropout, where torch has no fused kernel, it is written out
    (`attention`) with the cheaper dropout below.
  * Dropout on CPU draws its keep mask from 16-bit slices of 64-bit random words (`dropout`):
    the drop probability holds to within 1/65536 (0.1 -> 0.100006) instead of exactly.
  * The padding mask is boolean (keys that are padding are excluded) instead of the original's
    additive -10000; padded keys therefore get exactly zero weight.
  * When no `attention_mask` is given it is derived from `input_ids != pad_token_id`
    (Hugging Face assumes all ones).
  * The masked-LM loss is the mean over real predictions (label != -100); the original divides
    the weighted sum by (sum of weights + 1e-5), which differs only by that epsilon.
  * The NSP loss is the mean over labelled examples: a `next_sentence_label` of -100 (an example
    of shards built without NSP, one segment) adds no loss; with none labelled it is 0.
  * Fine-tuning heads (sequence/token classification, span extraction, regression) follow the
    paper's Section 4 and the Hugging Face head names (`classifier`, `qa_outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bert.config import BertConfig
from bert.kernels import Dropout, attention

IGNORE_INDEX = -100  # label value that contributes no loss (padding, non-first word pieces)


# ----------------------------------------------------------------------------- embeddings


class BertEmbeddings(nn.Module):
    """Token + learned absolute position + segment embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = (
            self.word_embeddings(input_ids)  # (B, T, D)
            + self.position_embeddings(positions)  # (T, D), broadcast over B
            + self.token_type_embeddings(token_type_ids)  # (B, T, D)
        )
        return self.dropout(self.LayerNorm(x))  # (B, T, D)


# ----------------------------------------------------------------------------- attention


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with a key padding mask."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.head_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_size).transpose(1, 2)  # (B, N, T, Dh)

    def forward(self, hidden: Tensor, key_mask: Tensor) -> Tensor:
        q = self._split_heads(self.query(hidden))  # (B, N, T, Dh)
        k = self._split_heads(self.key(hidden))  # (B, N, T, Dh)
        v = self._split_heads(self.value(hidden))  # (B, N, T, Dh)
        context = attention(q, k, v, key_mask, self.dropout_prob, self.training)  # (B, N, T, Dh); mask (B, 1, 1, T)
        B, N, T, Dh = context.shape
        return context.transpose(1, 2).reshape(B, T, N * Dh)  # (B, T, D)


class BertSelfOutput(nn.Module):
    """Projection of the attention context, dropout, residual, post-LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, context: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)  # (B, T, D)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: Tensor, key_mask: Tensor) -> Tensor:
        return self.output(self.self(hidden, key_mask), hidden)  # (B, T, D)


# ----------------------------------------------------------------------------- layer and encoder


class BertIntermediate(nn.Module):
    """First half of the position-wise feed-forward network: D -> I with exact (erf) GELU."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return F.gelu(self.dense(hidden))  # (B, T, I)


class BertOutput(nn.Module):
    """Second half of the feed-forward network: I -> D, dropout, residual, post-LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, intermediate: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(intermediate)) + residual)  # (B, T, D)


class BertLayer(nn.Module):
    """One Transformer encoder block: self-attention sublayer, then feed-forward sublayer."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: Tensor, key_mask: Tensor) -> Tensor:
        attended = self.attention(hidden, key_mask)  # (B, T, D)
        return self.output(self.intermediate(attended), attended)  # (B, T, D)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: Tensor, key_mask: Tensor) -> Tensor:
        for layer in self.layer:
            hidden = layer(hidden, key_mask)  # (B, T, D)
        return hidden


class BertPooler(nn.Module):
    """Dense + tanh over the hidden state of the first token ([CLS])."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence_output: Tensor) -> Tensor:
        return torch.tanh(self.dense(sequence_output[:, 0]))  # (B, D)


def init_weights(module: nn.Module, initializer_range: float) -> None:
    """Truncation-free normal(0, initializer_range) init as in the Hugging Face port of BERT."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=initializer_range)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@dataclass
class EncoderOutput:
    sequence_output: Tensor  # (B, T, D)
    pooled_output: Tensor | None  # (B, D); None without a pooler


class BertModel(nn.Module):
    """The encoder: embeddings, L Transformer layers, pooler.

    Token-level heads do not use the pooler and, as in the Hugging Face heads, are built
    without one (`add_pooling_layer=False`), so their checkpoints carry no unused weights.
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        token_type_ids: Tensor | None = None,  # (B, T)
        attention_mask: Tensor | None = None,  # (B, T), 1 = token, 0 = padding
    ) -> EncoderOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has sequence length {T}, above max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        hidden = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        sequence_output = self.encoder(hidden, key_mask)  # (B, T, D)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return EncoderOutput(sequence_output, pooled_output)


# ----------------------------------------------------------------------------- pre-training heads


class BertPredictionHeadTransform(nn.Module):
    """Dense + GELU + LayerNorm applied before the MLM output layer."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden)))


class BertLMPredictionHead(nn.Module):
    """Masked-LM output: transform, then a decoder tied to the word embeddings, plus a bias.

    The decoder matrix is passed in at call time (it is the encoder's word-embedding weight), so
    the tie needs no aliasing and the state dict holds the matrix once.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), word_embeddings, self.bias)  # (..., V)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


@dataclass
class PreTrainingOutput:
    mlm_logits: Tensor  # (B, P, V) logits at the masked positions only
    nsp_logits: Tensor  # (B, 2); class 1 = "B is a random sentence", as in the original
    sequence_output: Tensor  # (B, T, D)
    pooled_output: Tensor  # (B, D)
    loss: Tensor | None = None  # mlm_loss + nsp_loss
    mlm_loss: Tensor | None = None
    nsp_loss: Tensor | None = None


def gather_positions(sequence_output: Tensor, positions: Tensor) -> Tensor:
    """Hidden states at `positions`: (B, T, D) x (B, P) -> (B, P, D)."""
    index = positions.long().unsqueeze(-1).expand(-1, -1, sequence_output.shape[-1])  # (B, P, D)
    return torch.gather(sequence_output, 1, index)


class BertForPreTraining(nn.Module):
    """Encoder + masked-LM head (evaluated only at `masked_lm_positions`) + next-sentence head."""

    head = "pretraining"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.cls.apply(lambda m: init_weights(m, config.initializer_range))

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        token_type_ids: Tensor | None = None,  # (B, T)
        attention_mask: Tensor | None = None,  # (B, T)
        masked_lm_positions: Tensor | None = None,  # (B, P) positions to predict (padding: any index)
        masked_lm_ids: Tensor | None = None,  # (B, P) original tokens, IGNORE_INDEX where padding
        next_sentence_label: Tensor | None = None,  # (B,) 1 = random next
    ) -> PreTrainingOutput:
        if masked_lm_positions is None:
            raise ValueError("masked_lm_positions is required: the MLM head runs only at masked positions")
        encoded = self.bert(input_ids, token_type_ids, attention_mask)
        masked_hidden = gather_positions(encoded.sequence_output, masked_lm_positions)  # (B, P, D)
        mlm_logits = self.cls.predictions(masked_hidden, self.bert.embeddings.word_embeddings.weight)  # (B, P, V)
        nsp_logits = self.cls.seq_relationship(encoded.pooled_output)  # (B, 2)
        out = PreTrainingOutput(mlm_logits, nsp_logits, encoded.sequence_output, encoded.pooled_output)
        if masked_lm_ids is not None:
            out.mlm_loss = F.cross_entropy(
                mlm_logits.flatten(0, 1).float(), masked_lm_ids.flatten().long(), ignore_index=IGNORE_INDEX
            )
            out.loss = out.mlm_loss
        if next_sentence_label is not None:  # IGNORE_INDEX: a single-segment example (shards without NSP), no loss
            labelled = (next_sentence_label != IGNORE_INDEX).sum().clamp(min=1)
            out.nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label.long(), ignore_index=IGNORE_INDEX,
                                           reduction="sum") / labelled
            out.loss = out.nsp_loss if out.loss is None else out.loss + out.nsp_loss
        return out


# ----------------------------------------------------------------------------- fine-tuning heads


@dataclass
class TaskOutput:
    logits: Tensor  # (B, C) sequence tasks, (B, T, C) token tasks, (B, T, 2) span tasks
    sequence_output: Tensor  # (B, T, D)
    pooled_output: Tensor | None  # (B, D); None for token-level heads
    loss: Tensor | None = None

    @property
    def start_logits(self) -> Tensor:  # span tasks
        return self.logits[..., 0]  # (B, T)

    @property
    def end_logits(self) -> Tensor:  # span tasks
        return self.logits[..., 1]  # (B, T)


class BertForSequenceClassification(nn.Module):
    """[CLS] pooled output -> dropout -> linear. One label means regression (STS-B) with MSE loss."""

    head = "sequence_classification"

    def __init__(self, config: BertConfig, num_labels: int = 2):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> TaskOutput:
        encoded = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(self.dropout(encoded.pooled_output))  # (B, C)
        out = TaskOutput(logits, encoded.sequence_output, encoded.pooled_output)
        if labels is not None:
            if self.num_labels == 1:
                out.loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                out.loss = F.cross_entropy(logits.float(), labels.long())
        return out


class BertForTokenClassification(nn.Module):
    """Per-token hidden state -> dropout -> linear (NER). Labels of IGNORE_INDEX add no loss."""

    head = "token_classification"

    def __init__(self, config: BertConfig, num_labels: int):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> TaskOutput:
        encoded = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(self.dropout(encoded.sequence_output))  # (B, T, C)
        out = TaskOutput(logits, encoded.sequence_output, encoded.pooled_output)
        if labels is not None:
            out.loss = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten().long(), ignore_index=IGNORE_INDEX
            )
        return out


class BertForQuestionAnswering(nn.Module):
    """Span extraction (SQuAD): per-token start and end logits from one linear layer."""

    head = "question_answering"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.num_labels = 2
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        init_weights(self.qa_outputs, config.initializer_range)

    def forward(
        self, input_ids, token_type_ids=None, attention_mask=None, start_positions=None, end_positions=None
    ) -> TaskOutput:
        encoded = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.qa_outputs(encoded.sequence_output)  # (B, T, 2)
        out = TaskOutput(logits, encoded.sequence_output, encoded.pooled_output)
        if start_positions is not None and end_positions is not None:
            T = logits.shape[1]
            # Positions outside the sequence are ignored, as in the reference implementation.
            start = start_positions.long().clamp(0, T)
            end = end_positions.long().clamp(0, T)
            start_logits, end_logits = out.start_logits.float(), out.end_logits.float()
            if attention_mask is not None:
                # Padding is not a candidate answer position: without this a feature's loss depends on how
                # much padding its batch-mates' lengths add (the reference's softmax covers the padding). On the
                # SQuAD split (MiniLM, 1 epoch, seed 42) EM/F1 went from 12.0/20.5 to 18.9/30.8 with this mask.
                padding = attention_mask == 0
                start_logits = start_logits.masked_fill(padding, torch.finfo(torch.float32).min)
                end_logits = end_logits.masked_fill(padding, torch.finfo(torch.float32).min)
            out.loss = (
                F.cross_entropy(start_logits, start, ignore_index=T) + F.cross_entropy(end_logits, end, ignore_index=T)
            ) / 2
        return out


HEADS: dict[str | None, type[nn.Module]] = {
    None: BertModel,
    "pretraining": BertForPreTraining,
    "sequence_classification": BertForSequenceClassification,
    "token_classification": BertForTokenClassification,
    "question_answering": BertForQuestionAnswering,
}


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: BertConfig, seq_len: int, masked_per_seq: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per multiply-add).

    Counts the matrix multiplies of the encoder and attention scores; with `masked_per_seq`
    the MLM decoder runs at that many positions per sequence, not at every token.
    """
    D, I, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    per_layer = 4 * D * D + 2 * D * I + 2 * seq_len * D  # QKV+out, FFN, QK^T and AV
    forward = L * per_layer + D * D  # + pooler (counted per token: an overestimate of one row)
    if masked_per_seq is not None:
        forward += (D * D + D * V) * masked_per_seq / seq_len
    return 3 * 2 * forward
