"""The methods the vLLM rollout engine adds to vLLM's worker (``worker_extension_cls``); vLLM imports this module.

``spear_load_weights(weights)`` loads a trainer's ``state_dict`` (Hugging Face names, any dtype) through the model
runner's ``reload_weights``, which also redoes the per-layer post-processing (on a CPU, the weight packing of the
matrix-multiply library). A tied lm_head shares the embedding's weight but keeps its own packed copy, so it is packed
again here: without that it would keep the old weights.
"""

from __future__ import annotations


class WeightSync:
    def spear_load_weights(self, weights: dict) -> int:
        runner = self.model_runner
        runner.reload_weights(weights_iterator=iter(weights.items()))
        model = runner.get_model()
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        tied = head is not None and embed is not None and head.weight is embed.weight
        if tied and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)
        return len(weights)
