"""What a model's forward reads from a collated batch, for every forward in the package."""

from __future__ import annotations

from typing import Any, Literal

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids", "decoder_attention_mask")
"""The batch keys a model reads (an encoder-decoder's decoder reads the teacher-forced target); a batch also
carries labels, row ids, ..."""


def model_inputs(batch: dict[str, Any], *, inputs_embeds: torch.Tensor | None = None,
                 decoder_inputs_embeds: torch.Tensor | None = None) -> dict[str, Any]:
    """The model's keyword inputs from a collated batch: input_ids, attention_mask, and token_type_ids or the
    decoder's inputs where the batch holds them (tokenised with segments, or for an encoder-decoder). Every
    forward takes its inputs from here, so none drops the segment ids or the decoder's inputs. `inputs_embeds`
    (`decoder_inputs_embeds`): passed instead of input_ids (decoder_input_ids), for gradients with respect to the
    embeddings."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    if inputs_embeds is not None:
        del inputs["input_ids"]
        inputs["inputs_embeds"] = inputs_embeds
    if decoder_inputs_embeds is not None:
        del inputs["decoder_input_ids"]
        inputs["decoder_inputs_embeds"] = decoder_inputs_embeds
    return inputs


def stack_states(output: Any, stack: Literal["encoder", "decoder"]) -> tuple[torch.Tensor, ...]:
    """A model output's hidden states of `stack` (output_hidden_states=True): an encoder-decoder's encoder or
    decoder states, every other model's `hidden_states` (its one stack, "encoder")."""
    if getattr(output, "encoder_hidden_states", None) is not None:
        return output.encoder_hidden_states if stack == "encoder" else output.decoder_hidden_states
    if stack == "decoder":
        raise ValueError("stack='decoder': the model has no decoder (not an encoder-decoder)")
    return output.hidden_states


def stack_mask(batch: dict[str, Any], stack: Literal["encoder", "decoder"]) -> torch.Tensor:
    """The real positions of `stack`: the attention mask, or an encoder-decoder's decoder attention mask."""
    return batch["attention_mask"] if stack == "encoder" else batch["decoder_attention_mask"]


def output_logits(output: Any) -> torch.Tensor:
    """A model output's logits: `.logits`, or an extractive QA model's start and end logits stacked (B, T, 2),
    the one tensor the loss terms, the teacher cache and evaluation pass around."""
    if getattr(output, "start_logits", None) is not None:
        return torch.stack([output.start_logits, output.end_logits], dim=-1)
    return output.logits
