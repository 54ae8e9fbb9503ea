"""Each augmentation's exact semantics: crop, flip, cutout, colour jitter, seeding, shares."""
import torch
import torch.nn.functional as F

from helpers import tiny_config
import speedrun


def images(n=16, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_flip_is_an_exact_mirror_of_the_chosen_images():
    x = images()
    augment = speedrun.EpochAugmenter(tiny_config(crop_pad=0, cutout=0, flip="random"), torch.Generator().manual_seed(1))
    y = augment(x, epoch=0)
    flipped = [torch.equal(y[i], x[i].flip(2)) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept)), "each image is either mirrored exactly or untouched"
    assert 0 < sum(flipped) < len(x)
    assert torch.equal(y[0].flip(2).flip(2), y[0])


def test_alternating_flip_mirrors_the_complement_on_odd_epochs():
    x = images(64)
    augment = speedrun.EpochAugmenter(tiny_config(crop_pad=0, flip="alternating"), torch.Generator().manual_seed(2))
    masks = []
    for epoch in range(4):
        y = augment(x, epoch)
        masks.append(torch.tensor([torch.equal(y[i], x[i].flip(2)) for i in range(len(x))]))
    assert 10 < masks[0].sum() < 54
    assert torch.equal(masks[1], ~masks[0]) and torch.equal(masks[2], masks[0]) and torch.equal(masks[3], ~masks[0])


def test_no_flip_leaves_images_alone():
    x = images()
    y = speedrun.EpochAugmenter(tiny_config(crop_pad=0, flip="none"), torch.Generator())(x, 0)
    assert torch.equal(x, y)


def test_crop_is_a_window_of_the_reflect_padded_image_at_every_offset():
    pad, n = 4, 400
    x = images(n)
    cfg = tiny_config(crop_pad=pad, flip="none", cutout=0)
    y = speedrun.EpochAugmenter(cfg, torch.Generator().manual_seed(3))(x, 0)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    offsets = set()
    for i in range(n):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(padded[i, :, dy:dy + 32, dx:dx + 32], y[i])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) == (2 * pad + 1) ** 2, "every offset occurs with 400 images"


def test_crop_with_zero_padding_is_identity():
    x = images()
    cfg = tiny_config(crop_pad=0, flip="none", cutout=0)
    assert torch.equal(speedrun.EpochAugmenter(cfg, torch.Generator())(x, 0), x)


def test_cutout_zeroes_one_square_inside_each_image():
    size, n = 8, 200
    x = torch.rand(n, 3, 32, 32) + 1  # no zeros anywhere
    cfg = tiny_config(crop_pad=0, flip="none", cutout=size)
    y = speedrun.EpochAugmenter(cfg, torch.Generator().manual_seed(4))(x, 0)
    corners = set()
    for i in range(n):
        zero = y[i] == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2]), "same square in every channel"
        rows, cols = zero[0].nonzero(as_tuple=True)
        assert zero[0].sum() == size * size
        assert rows.max() - rows.min() == size - 1 and cols.max() - cols.min() == size - 1
        assert torch.equal(y[i][~zero], x[i][~zero])
        corners.add((rows.min().item(), cols.min().item()))
    assert len(corners) > 100, "positions vary"


def test_colour_jitter_shifts_then_scales_each_image_within_its_ranges():
    cfg = speedrun.make_config(crop_pad=0, flip="none", brightness=0.2, contrast=0.3)
    augment = speedrun.EpochAugmenter(cfg, torch.Generator().manual_seed(0))
    x = torch.randn(500, 3, 32, 32)
    draw = augment.draw(500, 0, "cpu")
    assert draw.shift.abs().max() <= 0.2 and (draw.scale - 1).abs().max() <= 0.3
    assert draw.shift.min() < -0.15 and draw.shift.max() > 0.15, "uniform over the whole range"
    torch.testing.assert_close(augment.apply(x, draw), (x + draw.shift.view(-1, 1, 1, 1)) * draw.scale.view(-1, 1, 1, 1))
    assert speedrun.EpochAugmenter(speedrun.make_config(), torch.Generator()).draw(8, 0, "cpu").shift is None


def test_augmentation_is_seeded():
    x = images()
    cfg = tiny_config(cutout=6, flip="random")
    a = speedrun.EpochAugmenter(cfg, torch.Generator().manual_seed(5))(x, 0)
    b = speedrun.EpochAugmenter(cfg, torch.Generator().manual_seed(5))(x, 0)
    c = speedrun.EpochAugmenter(cfg, torch.Generator().manual_seed(6))(x, 0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augmenting_a_share_equals_augmenting_all_then_picking_it():
    """What lets each process of a distributed run augment only its own images."""
    x = images(64)
    cfg = tiny_config(cutout=5, flip="alternating", crop_pad=3)
    aug = speedrun.EpochAugmenter(cfg, torch.Generator().manual_seed(7))
    for epoch in range(2):
        draw = aug.draw(len(x), epoch, x.device)
        idx = torch.randperm(64)[:20]
        assert torch.equal(aug.apply(x, draw, idx), aug.apply(x, draw)[idx])


def test_each_epoch_reaches_the_side_its_schedule_names_by_downsampling_or_a_window():
    x = images(8)
    cfg = tiny_config(crop_pad=0, flip="none", resolution_schedule="20,26")
    for epoch, side in [(0, 20), (1, 26), (2, 26)]:  # epochs past the list keep its last side
        down = speedrun.EpochAugmenter(cfg, torch.Generator().manual_seed(0))(x, epoch)
        torch.testing.assert_close(down, F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False))
        crop_cfg = tiny_config(crop_pad=0, flip="none", resolution_schedule="20,26", resolution_mode="crop")
        augment = speedrun.EpochAugmenter(crop_cfg, torch.Generator().manual_seed(0))
        draw = augment.draw(len(x), epoch, "cpu")
        windows = augment.apply(x, draw)
        assert windows.shape == (8, 3, side, side) and draw.side == side
        for i, (dy, dx) in enumerate(draw.window.tolist()):
            assert 0 <= dy <= 32 - side and 0 <= dx <= 32 - side
            assert torch.equal(windows[i], x[i, :, dy:dy + side, dx:dx + side])


def test_a_run_without_a_resolution_schedule_draws_no_windows_and_keeps_32_pixels():
    augment = speedrun.EpochAugmenter(tiny_config(resolution_mode="crop"), torch.Generator().manual_seed(0))
    draw = augment.draw(8, 0, "cpu")
    assert draw.side == 32 and draw.window is None and augment.apply(images(8), draw).shape[-1] == 32
