"""FPDTGPTModel: megatron-core's GPTModel on FPDT-layout sequences.

Same modules and parameters as GPTModel (use it with :func:`get_fpdt_layer_spec`);
the forward differs in two places:

* rotary embeddings are taken at the tokens' true global positions (the
  ``position_ids`` of the FPDT layout), not at 0..s/P-1;
* with labels, logits and loss come from :func:`chunked_lm_loss`, so no
  ``[s, vocab]`` tensor exists.

It returns the per-token loss ``[b, s/P]`` like GPTModel. Under a pipeline each stage is one
of these built with megatron-core's ``pre_process``/``post_process``: the first embeds, the
others take the previous stage's ``[s/P, b, h]`` output (``set_input_tensor``, as GPTModel),
the last computes the loss and the others return their hidden states. Every stage computes its
rotary frequencies from the positions of the FPDT layout, which it reads with the batch:
nothing but the hidden states passes between stages.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from fpdt_ext.core.config import FPDTConfig
from fpdt_ext.core.config import loss_chunks
from fpdt_ext.mcore.loss import chunked_lm_loss


class FPDTGPTModel(GPTModel):
    def __init__(self, *args, fpdt_config: FPDTConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.fpdt_config = fpdt_config
        self._rotary_cache = {}

    def _rotary_at(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotary frequencies at global positions: [s/P, b, 1, dim]."""
        span = self.max_sequence_length
        if span not in self._rotary_cache:
            self._rotary_cache = {span: self.rotary_pos_emb.get_emb(span)}  # [S, 1, 1, dim]
        table = self._rotary_cache[span]
        if table.device != position_ids.device:
            table = self._rotary_cache[span] = table.to(position_ids.device)
        s, b = position_ids.shape[1], position_ids.shape[0]
        return table[position_ids.t()].view(s, b, 1, table.shape[-1])

    def final_hidden(self, input_ids, position_ids, decoder_input=None) -> torch.Tensor:
        """The decoder's output (after the final norm on the last stage) at this rank's tokens:
        [s/P, b, h]. A stage after the first starts from its input tensor (set_input_tensor)."""
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s/P, b, h]
        # YaRN is built as "rope" with YaRN's frequencies (megatron.training.models.build_model)
        rotary = self._rotary_at(position_ids) if self.position_embedding_type == "rope" else None
        return self.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary)

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight (the embedding's when they are tied): [V/tp, h]."""
        return (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                else self.output_layer.weight)

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, loss_mask=None,
                decoder_input=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("FPDT models are causal by construction; pass attention_mask=None")
        unsupported = {k: v for k, v in kwargs.items() if v is not None}
        if unsupported:
            raise ValueError(f"FPDTGPTModel.forward does not support {sorted(unsupported)}")
        hidden = self.final_hidden(input_ids, position_ids, decoder_input)
        if not self.post_process:  # a stage before the last: its hidden states go to the next
            return hidden
        weight = self.output_weight()
        if labels is None:  # full logits: for short inputs only
            logits, _ = self.output_layer(hidden, weight=weight)
            return logits.transpose(0, 1).contiguous()  # [b, s/P, V/tp]
        chunks = loss_chunks(hidden.shape[0] * hidden.shape[1], weight.shape[0],
                             at_least=self.fpdt_config.local_chunks(hidden.shape[0]))
        return chunked_lm_loss(hidden, weight, labels, tp_group=self.pg_collection.tp, num_chunks=chunks)
