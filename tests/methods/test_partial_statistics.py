"""Partial statistics merged from several processes equal one pass over all the rows."""
import torch

from cram_ray.methods.common import TaskAnchors
from cram_ray.methods.cram.router import FeatureMoments


def _rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return 5.0 + torch.randn(n, d, generator=g, dtype=torch.float64)  # a large shared offset, as features have


def test_moments_merged_from_parts_with_their_own_shifts_equal_a_single_pass():
    x = _rows(40, 6, 0)
    one = FeatureMoments(full=True)
    for a in range(0, 40, 8):
        one.add(x[a:a + 8])
    merged = FeatureMoments(full=True)
    for a, b in ((0, 7), (7, 23), (23, 40)):  # other batch boundaries: every part has another shift
        part = FeatureMoments(full=True)
        for c in range(a, b, 5):
            part.add(x[c:min(c + 5, b)])
        merged.merge(FeatureMoments.from_tensors(part.to_tensors("p"), "p", True))
    assert merged.n == one.n == 40
    assert torch.allclose(merged.mean(), x.mean(0), rtol=1e-12, atol=0)
    assert torch.allclose(merged.scatter(), one.scatter(), rtol=1e-9, atol=1e-9)
    centred = x - x.mean(0)
    assert torch.allclose(merged.scatter(), centred.T @ centred, rtol=1e-9, atol=1e-9)
    assert abs(merged.sum_sq_dev() - float((centred ** 2).sum())) < 1e-9 * float((centred ** 2).sum())
    fourth = float(((centred ** 2).sum(1) ** 2).sum())
    assert abs(merged.sum_fourth_dev() - fourth) < 1e-8 * fourth


def test_merging_into_empty_moments_and_merging_empty_parts():
    x = _rows(10, 3, 1)
    part = FeatureMoments(full=False)
    part.add(x)
    merged = FeatureMoments(full=False)
    merged.merge(FeatureMoments())
    merged.merge(FeatureMoments.from_tensors(part.to_tensors("q"), "q", False))
    assert merged.n == 10 and torch.equal(merged.mean(), part.mean()) and merged.sum_sq_dev() == part.sum_sq_dev()


def test_task_anchor_sums_taken_in_parts_merge_to_the_single_pass_means():
    img, txt = _rows(12, 4, 2), _rows(12, 5, 3)
    has = torch.tensor([True, False] * 6)
    whole = TaskAnchors()
    whole.observe({"img_feat": img, "txt_feat": txt, "has_image": has})
    workers = [TaskAnchors(), TaskAnchors()]
    workers[0].observe({"img_feat": img[:5], "txt_feat": txt[:5], "has_image": has[:5]})
    workers[1].observe({"img_feat": img[5:], "txt_feat": txt[5:], "has_image": has[5:]})
    stage = TaskAnchors()
    stage.merge([w.take() for w in workers])
    assert workers[0].current_txt.n == 0  # taking forgets what was taken
    assert stage.current_txt.n == 12 and stage.current_img.n == 6
    assert torch.allclose(stage.current_txt.mean(), whole.current_txt.mean(), rtol=1e-12, atol=0)
    assert torch.allclose(stage.current_img.mean(), whole.current_img.mean(), rtol=1e-12, atol=0)
