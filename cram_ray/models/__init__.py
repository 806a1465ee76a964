"""The vision-language model (no Ray here).

* ``tokenizer``: :class:`CompactTokenizer`, GPT-2 BPE remapped to a few thousand ids.
* ``vlm``: :func:`build_tiny_llava`, :class:`VLMProcessor` (records -> batches), :class:`VLM`,
  :func:`save_vlm` / :func:`load_vlm`, :func:`load_hf_llava`.
* ``base``: stage 0, :func:`get_base_vlm` (shipped base, else cache, else pretrain) and :func:`build_vlm`.
* ``features``: frozen routing features, :class:`ImageRoutingEncoder`, :class:`TextRoutingEncoder`,
  :func:`add_routing_features`.

Submodules are imported explicitly (``from cram_ray.models.vlm import VLM``) so that importing the
tokenizer does not pull in transformers.
"""
