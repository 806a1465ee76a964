"""Persistence: save_vlm/load_vlm round-trips exactly; a local HF Llava checkpoint loads offline."""
import json

import pytest
import torch

from cram_ray.models.vlm import (
    VLM,
    build_tiny_llava,
    compact_processor,
    load_hf_llava,
    load_vlm,
    model_inputs,
    save_vlm,
)

from models_testdata import scene_records


@pytest.fixture(scope="module")
def records(tiny_cfg):
    return scene_records(6, tiny_cfg.model.image_size, seed=3)


def test_save_load_round_trip_is_exact(tmp_path, tiny_cfg, tok, records):
    torch.manual_seed(1)
    vlm = VLM(build_tiny_llava(tiny_cfg.model, tok), compact_processor(tiny_cfg.model, tiny_cfg.data, tok),
              tiny_cfg.model, {"note": "x"})
    vlm.model.eval()
    save_vlm(vlm, tmp_path / "vlm")
    assert not list((tmp_path / "vlm").glob("*.bin")) and not list((tmp_path / "vlm").glob("*.pt"))
    json.loads((tmp_path / "vlm" / "vlm.json").read_text())  # plain JSON
    back = load_vlm(tmp_path / "vlm")
    assert back.cfg == vlm.cfg and back.meta == {"note": "x"}
    assert back.processor.text == vlm.processor.text
    batch = vlm.processor.train_batch(records, [0] * len(records))
    again = back.processor.train_batch(records, [0] * len(records))
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(batch[key], again[key])
    with torch.no_grad():
        assert torch.equal(vlm.model(**model_inputs(batch)).logits, back.model(**model_inputs(batch)).logits)
    for (name, a), (name_b, b) in zip(vlm.model.state_dict().items(), back.model.state_dict().items()):
        assert name == name_b and torch.equal(a, b)


def test_load_vlm_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_vlm"):
        load_vlm(tmp_path / "nothing")


def make_hf_checkpoint(directory, image_size: int = 32):
    """A tiny Llava in llava-1.5-hf layout: safetensors, config, tokenizer and image processor files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<image>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["USER: What colour is the shape? ASSISTANT: red green blue",
                             "How many shapes are there? 1 2 3 4", "What is written? cat sun map"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        extra_special_tokens=["<image>"])
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // 8) ** 2)  # llava-1.5 defaults: layer -2, drop CLS
    torch.manual_seed(2)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return model


def test_load_hf_llava_matches_the_in_memory_model(tmp_path, tiny_cfg, records, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = make_hf_checkpoint(tmp_path / "ckpt")
    assert list((tmp_path / "ckpt").glob("*.safetensors"))
    vlm = load_hf_llava(str(tmp_path / "ckpt"), tiny_cfg)
    assert vlm.processor.num_image_tokens == 16
    batch = vlm.processor.train_batch(records, [0] * len(records))
    assert (batch["input_ids"] == ref.config.image_token_id).sum(1).tolist() == [16] * len(records)
    with torch.no_grad():
        want = ref(**model_inputs(batch))
        got = vlm.loss(batch)
    assert torch.allclose(got.logits, want.logits, atol=1e-6)
    assert torch.allclose(got.loss, want.loss, atol=1e-6)
    labels = batch["labels"][0]
    answer = vlm.processor.text.decode(labels[labels >= 0].tolist())
    assert answer.strip() == records[0].answer
    answers = vlm.generate(vlm.processor.prompt_batch(records, [0] * len(records)), max_new_tokens=3)
    assert len(answers) == len(records) and all(isinstance(a, str) for a in answers)


def test_load_hf_llava_rejects_a_missing_checkpoint(tmp_path, tiny_cfg):
    with pytest.raises(FileNotFoundError, match="model.path"):
        load_hf_llava(str(tmp_path), tiny_cfg)
