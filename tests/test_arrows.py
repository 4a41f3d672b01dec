"""The arrow-pointing data set: determinism, balance, the labelling rule, rendering and argument checks."""

import math

import numpy as np
import pytest
import torch

from mdlrnn.data import ArrowGeometry, ArrowPointing

SMALL = dict(padding=8, radius=(4, 8), arrow_length=(6, 12), line_width=(1, 3))  # radius[1] <= padding
CONFIGS = [pytest.param(96, SMALL, id="96px-small-shapes"), pytest.param(192, {}, id="192px-defaults")]


def test_same_seed_and_index_give_the_same_item_in_any_read_order():
    first, second = ArrowPointing(50, 192, seed=3), ArrowPointing(50, 192, seed=3)
    later = [second[i] for i in (40, 7, 49, 0)]
    for (image, label), index in zip(later, (40, 7, 49, 0)):
        expected_image, expected_label = first[index]
        assert torch.equal(image, expected_image) and label == expected_label
    assert first.geometry(-1) == first.geometry(49)


def test_different_seeds_differ():
    a, b = ArrowPointing(10, 192, seed=0), ArrowPointing(10, 192, seed=1)
    assert all(a.geometry(i) != b.geometry(i) for i in range(10))
    assert not torch.equal(a[0][0], b[0][0])


def test_labels_are_balanced():
    data = ArrowPointing(2000, 192, seed=11)
    assert abs(np.mean([data.geometry(i).label for i in range(len(data))]) - 0.5) < 0.03


@pytest.mark.parametrize("size, shapes", CONFIGS)
def test_geometry_follows_the_rule(size, shapes):
    data = ArrowPointing(500, size, seed=5, **shapes)
    for i in range(len(data)):
        g = data.geometry(i)
        if g.label:
            assert g.ray_distance() <= g.radius / 1.2 + 1e-9
        else:
            assert g.ray_distance() > 1.2 * g.radius - 1e-9
        cx, cy = g.centre
        assert g.radius <= cx <= size - g.radius and g.radius <= cy <= size - g.radius
        assert all(abs(c - m) >= 2 * g.radius - 1e-9 for c, m in zip(g.centre, g.midpoint))
        assert data.radius[0] <= g.radius < data.radius[1]
        assert data.arrow_length[0] <= g.length < data.arrow_length[1]
        assert data.line_width[0] <= g.width < data.line_width[1]


def test_ray_distance():
    g = ArrowGeometry(midpoint=(0.0, 0.0), direction=0.0, length=20, width=2, centre=(10.0, 3.0), radius=5.0, label=0)
    assert g.ray_distance() == pytest.approx(3.0)
    behind = ArrowGeometry(midpoint=(0.0, 0.0), direction=math.pi, length=20, width=2, centre=(10.0, 3.0), radius=5.0, label=0)
    assert behind.ray_distance() == pytest.approx(math.hypot(10, 3))


@pytest.mark.parametrize("size, shapes", CONFIGS)
def test_rendering(size, shapes):
    data = ArrowPointing(50, size, seed=2, **shapes)
    for i in range(len(data)):
        image, label = data[i]
        g = data.geometry(i)
        assert image.shape == (3, size, size) and image.dtype == torch.float32 and label == g.label
        assert image.min() >= 0 and image.max() <= 1
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        assert torch.equal(image, data.render(g))
        assert image[:, [0, 0, -1, -1], [0, -1, 0, -1]].eq(1).all()
        assert image[0, round(g.centre[1]), round(g.centre[0])] == 0
        x, y = round(g.midpoint[0]), round(g.midpoint[1])
        if g.width >= 2:  # the nearest pixel centre is at most 0.71 px from the shaft
            assert image[0, y, x] == 0
            for end_x, end_y in arrow_ends(g):
                assert image[0, round(end_y), round(end_x)] == 0
        else:  # a 1 px line passes within 0.5 px of a pixel next to the midpoint
            assert image[0, y - 1 : y + 2, x - 1 : x + 2].min() == 0


def arrow_ends(g):
    """The shaft's tail and the two head strokes' free ends."""
    (x, y), half = g.midpoint, g.length / 2
    tip_x, tip_y = x + half * math.cos(g.direction), y + half * math.sin(g.direction)
    ends = [(x - half * math.cos(g.direction), y - half * math.sin(g.direction))]
    for side in (1, -1):
        angle = g.direction + math.pi + side * 0.5
        ends.append((tip_x + g.length / 2.5 * math.cos(angle), tip_y + g.length / 2.5 * math.sin(angle)))
    return ends


def test_sizes_and_label_do_not_depend_on_image_size():
    small, large = ArrowPointing(200, 192, seed=4), ArrowPointing(200, 384, seed=4)
    for i in range(len(small)):
        a, b = small.geometry(i), large.geometry(i)
        assert (a.radius, a.length, a.width, a.label) == (b.radius, b.length, b.width, b.label)


def test_pil_output_and_transform():
    from PIL import Image

    image, label = ArrowPointing(3, 96, as_pil=True, **SMALL)[1]
    assert isinstance(image, Image.Image) and image.size == (96, 96) and image.mode == "RGB"
    tensor, _ = ArrowPointing(3, 96, **SMALL)[1]
    assert np.array_equal(np.asarray(image)[..., 0], (tensor[0].numpy() * 255).astype(np.uint8))

    flipped, label2 = ArrowPointing(3, 96, transform=lambda x: x.flip(-1), **SMALL)[1]
    assert label2 == label and torch.equal(flipped, tensor.flip(-1))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_samples=-1, image_size=192), "num_samples"),
        (dict(num_samples=2.5, image_size=192), "num_samples"),
        (dict(num_samples=4, image_size=180), "image_size"),
        (dict(num_samples=4, image_size=192, seed=-1), "seed"),
        (dict(num_samples=4, image_size=192, padding=-1), "padding"),
        (dict(num_samples=4, image_size=192, radius=(30, 15)), "radius"),
        (dict(num_samples=4, image_size=192, radius=(0, 15)), "radius"),
        (dict(num_samples=4, image_size=192, arrow_length=(15,)), "arrow_length"),
        (dict(num_samples=4, image_size=192, arrow_length=(15.5, 30)), "arrow_length"),
        (dict(num_samples=4, image_size=192, line_width=(3, 3)), "line_width"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ArrowPointing(**kwargs)


def test_index_out_of_range():
    data = ArrowPointing(4, 192)
    for index in (4, -5):
        with pytest.raises(IndexError, match="index"):
            data[index]
    assert len(data) == 4 and len(ArrowPointing(0, 192)) == 0
