"""Peak resident memory of one training step of a random-init Llava on CPU, as JSON on stdout.

Run in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` small, so freed tensors go back to the OS and
the resident set follows live memory; the kernel's high-water mark (VmHWM, reset through
/proc/self/clear_refs) then gives the step's peak over a baseline taken after a warm-up step.
"""
import json
import sys
from pathlib import Path

import torch


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def main() -> None:
    from cram_ray.config import from_dict
    from cram_ray.methods import make_method
    from cram_ray.models.vlm import load_hf_llava, set_gradient_checkpointing
    from cram_ray.data.records import Record
    from cram_ray.train.loop import compute_loss, make_optimizer

    cfg = from_dict(json.loads(sys.argv[1]))
    torch.set_num_threads(1)
    words = [f"w{i}" for i in range(400)]
    vlm = load_hf_llava(None, cfg)
    model = vlm.model
    method = make_method(cfg)
    method.attach(model)
    set_gradient_checkpointing(model, cfg.train.gradient_checkpointing)
    params = method.trainable_parameters()
    opt = make_optimizer(params, 1e-3, 0.0)
    n = cfg.train.batch_size
    # the estimate's worst case: every sample's answer fills its text budget, so the loss projects
    # every text position onto the vocabulary
    answer = " ".join(words[: cfg.data.max_text_len])
    recs = [Record(id=str(i), task="t", image=None, instruction="", answer=answer, metric="exact") for i in range(n)]
    batch = vlm.processor.train_batch(recs, [0] * n)
    model.train()

    def step() -> None:
        loss, _ = compute_loss(model, method, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: optimizer state allocated, kernels initialised
    opt.zero_grad(set_to_none=True)
    base = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    peak = status_kib("VmHWM")
    print(json.dumps({"peak_delta": (peak - base) * 1024, "seq": int(batch["input_ids"].shape[1]),
                      "vocab": int(model.config.text_config.vocab_size)}))


if __name__ == "__main__":
    main()
