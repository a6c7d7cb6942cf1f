"""Table-free language models: transformers' GPT-NeoX with `embed_in` replaced by the fixed code lift.

Attention, MLP, blocks, rotary embeddings, KV cache, attention backends, gradient checkpointing and
generation are GPT-NeoX's own, inherited unchanged; only the input interface differs. Ships inside
every saved model directory, so it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTNeoXForCausalLM, GPTNeoXModel
from transformers.utils import logging
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXLayer,
    GPTNeoXPreTrainedModel,
    GPTNeoXRotaryEmbedding,
)

from .codes import CodeLift
from .configuration_tablefree import TableFreeConfig

logger = logging.get_logger(__name__)


def build_code_lift(config: TableFreeConfig) -> CodeLift:
    return CodeLift(
        config.build_code(),
        config.hidden_size,
        layout=config.code_layout,
        values=config.code_values,
        scale=config.code_scale,
    )


class TableFreePreTrainedModel(GPTNeoXPreTrainedModel):
    config_class = TableFreeConfig
    config: TableFreeConfig


class TableFreeModel(TableFreePreTrainedModel, GPTNeoXModel):
    """GPTNeoXModel whose input embedding is the parameter-free code lift."""

    def __init__(self, config: TableFreeConfig):
        # GPTNeoXModel.__init__ would allocate a V x d table only to drop it; build the same modules without it.
        GPTNeoXPreTrainedModel.__init__(self, config)
        self.config = config
        self.embed_in = build_code_lift(config)
        self.emb_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([GPTNeoXLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = GPTNeoXRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        # Named like GPTNeoXModel.forward, whose signature engines check (vLLM's Transformers backend); the cache
        # and the rest pass through by keyword, as each transformers version names them.
        if input_ids is not None and inputs_embeds is None:
            # The lift has no weight to follow `model.to(dtype)`; give it the model's dtype.
            inputs_embeds, input_ids = self.embed_in(input_ids, dtype=self.final_layer_norm.weight.dtype), None
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )

    def set_input_embeddings(self, value):
        # Engines that swap the input table for their own (SGLang's Transformers backend) meet the fixed code
        # here: it stays the input, and the table they offer is not kept, so no V x d table ever takes memory.
        if value is self.embed_in:
            return
        logger.warning_once(
            "a table-free model's input is its fixed code (code_family, code_layout, code_values, code_scale); "
            "the %s given to set_input_embeddings is not used",
            type(value).__name__,
        )


class TableFreeForCausalLM(TableFreePreTrainedModel, GPTNeoXForCausalLM):
    """GPTNeoXForCausalLM on the table-free base model; the output head stays untied and trainable."""

    _tied_weights_keys = None

    def __init__(self, config: TableFreeConfig):
        GPTNeoXPreTrainedModel.__init__(self, config)
        self.gpt_neox = TableFreeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError(
            "resize_token_embeddings is not supported on a table-free model: the code width follows "
            "vocab_size; build a new config with the new vocab_size instead"
        )


__all__ = ["TableFreeModel", "TableFreeForCausalLM", "TableFreePreTrainedModel"]
