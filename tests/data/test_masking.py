import math
from fractions import Fraction

import pytest
import torch

from dino_bridge.data.masking import MaskingGenerator, num_masked_patches_per_image, sample_ibot_masks
from dino_bridge.seeding import generator


def test_block_masks_have_exact_counts_for_every_target():
    masking = MaskingGenerator(14, 14, max_num_patches=98)
    for count in range(0, 197, 3):
        mask = masking(count, generator("exact", count))
        assert mask.shape == (14, 14) and mask.dtype == torch.bool
        assert int(mask.sum()) == count
    tiny = MaskingGenerator(3, 3)  # blocks rarely fit: the top-up must complete the count
    for count in range(10):
        assert int(tiny(count, generator("tiny", count)).sum()) == count
    with pytest.raises(ValueError, match="num_masking_patches"):
        masking(197, generator(0))


def _adjacent_masked_pairs(mask):
    return int((mask[1:] & mask[:-1]).sum() + (mask[:, 1:] & mask[:, :-1]).sum())


def test_masks_are_blocky_not_scattered():
    masking = MaskingGenerator(14, 14, max_num_patches=98)
    block_pairs = scattered_pairs = 0
    for i in range(20):
        block_pairs += _adjacent_masked_pairs(masking(40, generator("blocky", i)))
        scattered = torch.zeros(196, dtype=torch.bool)
        scattered[torch.randperm(196, generator=generator("scattered", i))[:40]] = True
        scattered_pairs += _adjacent_masked_pairs(scattered.view(14, 14))
    assert block_pairs > 2 * scattered_pairs


def test_reference_counts_and_total_3771():
    counts = num_masked_patches_per_image(128, 196, 0.5, (0.1, 0.5))
    assert len(counts) == 64 and counts[0] == 20 and counts[-1] == 98
    assert sum(counts) == 3771


@pytest.mark.parametrize("n_images", [2, 5, 8, 30, 128, 129])
@pytest.mark.parametrize("num_patches", [16, 49, 196, 256])
@pytest.mark.parametrize("probability,ratios", [(0.5, (0.1, 0.5)), (0.3, (0.1, 0.3)), (1.0, (0.2, 0.7))])
def test_counts_match_exact_rational_arithmetic(n_images, num_patches, probability, ratios):
    """Oracle: the floors in exact decimal arithmetic, immune to float rounding."""
    p, low, high = (Fraction(str(v)) for v in (probability, *ratios))
    n_masked = math.floor(n_images * p)
    expected = [
        math.floor(num_patches * (low + (high - low) * Fraction(i, n_masked))) for i in range(1, n_masked + 1)
    ]
    assert num_masked_patches_per_image(n_images, num_patches, probability, ratios) == expected


def test_sample_ibot_masks_counts_shuffle_and_determinism():
    masks = sample_ibot_masks(
        128, 14, 14, mask_probability=0.5, ratio_min_max=(0.1, 0.5), generator=generator("ibot", 0)
    )
    assert masks.shape == (128, 196) and masks.dtype == torch.bool
    per_image = masks.sum(dim=1)
    assert int(per_image.sum()) == 3771
    assert int((per_image > 0).sum()) == 64
    assert sorted(per_image[per_image > 0].tolist()) == num_masked_patches_per_image(
        128, 196, 0.5, (0.1, 0.5)
    )
    assert (per_image[:64] > 0).any() and (per_image[64:] > 0).any()  # shuffled, not masked-first
    again = sample_ibot_masks(
        128, 14, 14, mask_probability=0.5, ratio_min_max=(0.1, 0.5), generator=generator("ibot", 0)
    )
    other = sample_ibot_masks(
        128, 14, 14, mask_probability=0.5, ratio_min_max=(0.1, 0.5), generator=generator("ibot", 1)
    )
    assert torch.equal(masks, again) and not torch.equal(masks, other)


def test_circular_shift_keeps_counts():
    options = dict(mask_probability=0.5, ratio_min_max=(0.1, 0.5))
    plain = sample_ibot_masks(16, 8, 6, generator=generator(3), **options)
    shifted = sample_ibot_masks(16, 8, 6, generator=generator(3), random_circular_shift=True, **options)
    assert torch.equal(plain.sum(1), shifted.sum(1)) and not torch.equal(plain, shifted)


def test_no_masking_and_invalid_arguments():
    masks = sample_ibot_masks(6, 4, 4, mask_probability=0.0, ratio_min_max=(0.1, 0.5), generator=generator(0))
    assert not masks.any()
    with pytest.raises(ValueError, match="mask_probability"):
        num_masked_patches_per_image(4, 16, 1.5, (0.1, 0.5))
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        num_masked_patches_per_image(4, 16, 0.5, (0.6, 0.5))
