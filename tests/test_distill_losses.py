"""Distillation losses on plain tensors: the formulas, their invariances and the feature-pair parser."""

from __future__ import annotations

import math

import pytest
import torch

from dms_lightning.distill import HintAdapter, attention_transfer_loss, distillation_loss, kd_loss
from dms_lightning.distill.losses import MixedBatch, mix_batch
from dms_lightning.distill.features import capture_outputs, parse_feature_pairs


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_equals_t_squared_kl_computed_by_hand():
    student = [[1.0, -0.5, 2.0], [0.0, 0.3, -1.2]]
    teacher = [[3.0, 0.0, 1.0], [-1.0, 2.0, 0.5]]
    temperature = 4.0
    kl_per_sample = []
    for s, t in zip(student, teacher):
        p_s = _softmax([v / temperature for v in s])
        p_t = _softmax([v / temperature for v in t])
        kl_per_sample.append(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s)))
    expected = temperature**2 * sum(kl_per_sample) / len(kl_per_sample)

    got = kd_loss(torch.tensor(student), torch.tensor(teacher), temperature)

    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_weighs_cross_entropy_and_kd_by_alpha():
    student = torch.tensor([[1.0, -0.5, 2.0], [0.0, 0.3, -1.2]])
    teacher = torch.tensor([[3.0, 0.0, 1.0], [-1.0, 2.0, 0.5]])
    labels = torch.tensor([2, 1])
    ce_by_hand = sum(-math.log(_softmax(s.tolist())[y]) for s, y in zip(student, labels.tolist())) / 2

    loss, ce, kd = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.3)

    assert ce.item() == pytest.approx(ce_by_hand, rel=1e-5)
    assert kd.item() == pytest.approx(kd_loss(student, teacher, 2.0).item(), rel=1e-6)
    assert loss.item() == pytest.approx(0.7 * ce_by_hand + 0.3 * kd.item(), rel=1e-5)


def test_kd_loss_in_bf16_matches_float32():
    # Under bf16 autocast the logits arrive in bf16; the loss must still be computed in float32.
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    reference = kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), 4.0)

    got = kd_loss(student.bfloat16(), teacher.bfloat16(), 4.0)

    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)


def test_attention_transfer_ignores_channel_count_and_feature_scale():
    torch.manual_seed(0)
    teacher = torch.rand(2, 64, 8, 8)
    # 16 channels, 5x the scale, but the same spatial energy pattern as the 64-channel teacher.
    student = teacher.pow(2).mean(dim=1, keepdim=True).sqrt().expand(2, 16, 8, 8) * 5.0

    assert attention_transfer_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_transfer_loss(torch.rand(2, 16, 8, 8), teacher).item() > 0


def test_hint_adapter_maps_student_channels_and_pools_to_the_teacher_grid():
    adapter = HintAdapter(student_channels=24, teacher_channels=128)
    student, teacher = torch.randn(2, 24, 12, 12, requires_grad=True), torch.randn(2, 128, 6, 6)

    loss = adapter.loss(student, teacher)
    loss.backward()

    assert adapter(student).shape == (2, 128, 12, 12)
    assert adapter.project.weight.grad is not None and student.grad is not None


def test_hint_adapter_rejects_features_with_other_channel_count():
    adapter = HintAdapter(student_channels=24, teacher_channels=128)

    with pytest.raises(RuntimeError, match="built for 24"):
        adapter.loss(torch.randn(2, 16, 6, 6), torch.randn(2, 128, 6, 6))


def test_capture_outputs_removes_its_hooks():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
    with capture_outputs(net, ["0"]) as features:
        net(torch.zeros(1, 1, 8, 8))

    assert features["0"].shape == (1, 4, 6, 6)
    assert not net[0]._forward_hooks


@pytest.mark.parametrize("pairs", [[{"student": "features.8"}], [{"student": "a", "teacher": "b", "wieght": 1}],
                                   [["a", "b", -1.0]], ["features.8"]])
def test_malformed_feature_pair_is_rejected_naming_the_field(pairs):
    with pytest.raises(ValueError, match=r"model\.feature_hints\[0\]"):
        parse_feature_pairs("model.feature_hints", pairs, default_weight=1.0)


def test_feature_pairs_accept_mappings_and_lists_with_default_weight():
    pairs = parse_feature_pairs("f", [{"student": "a", "teacher": "b"}, ["c", "d", 2]], default_weight=500.0)

    assert [(p.student, p.teacher, p.weight) for p in pairs] == [("a", "b", 500.0), ("c", "d", 2.0)]


# ---------------------------------------------------------------------------------------------- function matching
def test_mixup_blends_each_image_with_its_partner_by_the_drawn_share():
    images = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 1, 3, 3).contiguous()
    generator = torch.Generator().manual_seed(3)

    batch = mix_batch(images, "mixup", generator)

    expected = batch.share * images + (1 - batch.share) * images[batch.partner]
    assert torch.allclose(batch.images, expected)
    assert sorted(batch.partner.tolist()) == [0, 1, 2, 3]  # a permutation of the batch
    assert 0.0 <= batch.share <= 1.0


def test_cutmix_pastes_a_rectangle_of_the_partner_covering_one_minus_the_share():
    images = torch.cat([torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = mix_batch(images, "cutmix", generator)
        for i in range(2):
            own = images[i, 0, 0, 0].item()
            kept = (batch.images[i] == own).float().mean().item()
            if batch.partner[i] != i:
                assert kept == pytest.approx(batch.share)  # the share reported is the area kept


def test_mixed_cross_entropy_weighs_both_labels_by_their_share():
    logits, teacher = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]), torch.zeros(2, 3)
    labels = torch.tensor([0, 1])
    mixed = MixedBatch(torch.zeros(2, 1, 1, 1), torch.tensor([1, 0]), 0.3)

    _, ce, _ = distillation_loss(logits, teacher, labels, alpha=0.0, mixed=mixed)

    own = torch.nn.functional.cross_entropy(logits, labels)
    other = torch.nn.functional.cross_entropy(logits, labels[mixed.partner])
    assert ce.item() == pytest.approx(0.3 * own.item() + 0.7 * other.item(), rel=1e-6)
    assert mixed.dominant_labels(labels).tolist() == [1, 0]  # the partner's label has the larger share


def test_unknown_mixing_mode_is_rejected():
    with pytest.raises(ValueError, match="mixing='mixupp'"):
        mix_batch(torch.zeros(2, 1, 4, 4), "mixupp")
