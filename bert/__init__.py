"""bertflow's single-device library: config, model, tokenizer, checkpoint I/O, data and tasks.

Never imports Ray, MLflow or torch.distributed (DESIGN.md): distribution and tracking live in
`pipelines/`.
"""

from bert.checkpoint import from_pretrained, save_pretrained
from bert.config import BertConfig, preset

__all__ = ["BertConfig", "from_pretrained", "preset", "save_pretrained"]
