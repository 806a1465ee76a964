"""Expert adapter layers: routed low-rank slots + probe buffer on frozen linears. No Ray here."""
from cram_ray.experts.adapter import (
    ATTENTION_TARGETS,
    FFN_TARGETS,
    ExpertLinear,
    LowRank,
    RoutingContext,
    block_index,
    contexts_of,
    export_slots,
    import_slots,
    inject_experts,
    load_slots,
    lora_init,
    save_slots,
)

__all__ = [
    "ATTENTION_TARGETS", "FFN_TARGETS", "ExpertLinear", "LowRank", "RoutingContext", "block_index",
    "contexts_of", "export_slots", "import_slots", "inject_experts", "load_slots", "lora_init", "save_slots",
]
