"""Protects carseg/labels.py: COCO reading and rasterising (overlap rule, problems), class masks and lists, flips, colours."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from carseg.labels import (BACKGROUND, flip_permutation, load_class_mask, palette, read_class_names,
                    read_coco)

# The Car Parts Dataset's 18 part names (public metadata, in category-id order after `_background_`).
CAR_PARTS = ["back_bumper", "back_glass", "back_left_door", "back_left_light", "back_right_door",
             "back_right_light", "front_bumper", "front_glass", "front_left_door", "front_left_light",
             "front_right_door", "front_right_light", "hood", "left_mirror", "right_mirror", "tailgate",
             "trunk", "wheel"]
W, H = 10, 8   # synthetic image size


def square(x0, y0, x1, y1):
    """A polygon list with one axis-aligned rectangle, corners (x0, y0) and (x1, y1)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def base_coco():
    """Two 10x8 images; categories background, door, mirror; a door on a.png, a mirror on b.png."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                   {"id": 2, "file_name": "b.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "_background_"}, {"id": 2, "name": "door"},
                       {"id": 3, "name": "mirror"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": square(1, 1, 4, 4)},
                        {"id": 2, "image_id": 2, "category_id": 3, "segmentation": square(0, 0, 2, 2)}],
    }


def write_coco(root: Path, coco: dict, files=None):
    """Write coco to root/annotations.json and blank PNGs (default: every listed name, at W x H)."""
    image_dir = root / "images"
    image_dir.mkdir(exist_ok=True)
    if files is None:
        files = {im["file_name"]: (W, H) for im in coco["images"]}
    for name, size in files.items():
        Image.new("RGB", size).save(image_dir / name)
    (root / "annotations.json").write_text(json.dumps(coco))
    return root / "annotations.json", image_dir


def read(root, coco, files=None):
    return read_coco(*write_coco(root, coco, files))


def test_square_polygon_rasterises_as_pycocotools_draws_it(tmp_path):
    items, names, problems = read(tmp_path, base_coco())
    assert problems == [] and names == [BACKGROUND, "door", "mirror"]
    assert [path.name for path, _ in items] == ["a.png", "b.png"]
    mask = items[0][1].rasterize()
    assert mask.dtype == np.uint8 and mask.shape == (H, W)
    # pycocotools covers a pixel whose centre is inside: corners 1..4 give pixels 1..3, area 9 not 16.
    expected = np.zeros((H, W), np.uint8)
    expected[1:4, 1:4] = 1
    assert np.array_equal(mask, expected)
    mirror = items[1][1].rasterize()
    assert (mirror[:2, :2] == 2).all() and mirror.sum() == 2 * 4   # corners 0..2: a 2x2 mirror, class 2


def test_shapes_are_hashable_plain_data(tmp_path):
    items, _, _ = read(tmp_path, base_coco())
    shapes = items[0][1]
    assert hash(shapes) == hash(copy.deepcopy(shapes))
    assert shapes.source == tmp_path / "annotations.json" and (shapes.width, shapes.height) == (W, H)
    with pytest.raises(AttributeError):
        shapes.width = 3


@pytest.mark.parametrize("small_first", [True, False])
def test_smaller_instance_wins_whatever_the_list_order(tmp_path, small_first):
    coco = base_coco()
    big = {"id": 5, "image_id": 1, "category_id": 2, "segmentation": square(0, 0, 10, 8)}
    small = {"id": 9, "image_id": 1, "category_id": 3, "segmentation": square(2, 2, 4, 4)}
    coco["annotations"] = [small, big] if small_first else [big, small]
    items, _, problems = read(tmp_path, coco)
    assert problems == []
    mask = items[0][1].rasterize()
    assert (mask[2:4, 2:4] == 2).all() and (mask == 2).sum() == 4 and (mask == 1).sum() == W * H - 4
    assert [cls for cls, _ in items[0][1].shapes] == [1, 2]   # stored in paint order, largest first


def test_equal_areas_paint_in_annotation_id_order(tmp_path):
    coco = base_coco()
    coco["annotations"] = [{"id": 7, "image_id": 1, "category_id": 2, "segmentation": square(0, 0, 4, 4)},
                           {"id": 3, "image_id": 1, "category_id": 3, "segmentation": square(2, 0, 6, 4)}]
    items, _, _ = read(tmp_path, coco)
    assert (items[0][1].rasterize()[0:4, 2:4] == 1).all()   # the higher id (7, door) is painted last


@pytest.mark.parametrize("compressed", [False, True])
def test_rle_segmentation(tmp_path, compressed):
    target = np.zeros((H, W), np.uint8)
    target[2:5, 3:9] = 1
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(target))
        rle["counts"] = rle["counts"].decode()
    else:   # column-major run lengths, starting with background
        flat = target.flatten(order="F")
        edges = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
        rle = {"size": [H, W], "counts": np.diff(np.r_[0, edges]).tolist()}
    coco = base_coco()
    coco["annotations"][0]["segmentation"] = rle
    items, _, problems = read(tmp_path, coco)
    assert problems == []
    assert np.array_equal(items[0][1].rasterize(), target)


def test_background_category_and_id_order(tmp_path):
    coco = base_coco()
    coco["categories"] = [{"id": 9, "name": "wheel"}, {"id": 4, "name": "Background"},
                          {"id": 2, "name": "hood"}]
    coco["annotations"] = [{"id": 1, "image_id": 1, "category_id": 9, "segmentation": square(0, 0, 4, 4)},
                           {"id": 2, "image_id": 1, "category_id": 2, "segmentation": square(6, 0, 8, 2)},
                           {"id": 3, "image_id": 1, "category_id": 4, "segmentation": square(0, 0, 10, 8)}]
    items, names, problems = read(tmp_path, coco)
    assert problems == [] and names == [BACKGROUND, "hood", "wheel"]
    mask = items[0][1].rasterize()
    assert (mask[0:4, 0:4] == 2).all() and (mask[0:2, 6:8] == 1).all()
    assert (mask == 0).sum() == W * H - 16 - 4   # the background annotation paints nothing
    assert len(items[0][1].shapes) == 2


def test_points_just_outside_the_edge_are_allowed(tmp_path):
    coco = base_coco()
    coco["annotations"][0]["segmentation"] = [[-1.5, -1.0, W + 1.5, 0, W, H + 2.0]]
    _, _, problems = read(tmp_path, coco)
    assert problems == []


def set_in(path, value):
    """A mutation setting coco[path...] = value."""
    def mutate(coco, root):
        target = coco
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def add_image_file(name, size=(W, H)):
    def mutate(coco, root):
        (root / "images").mkdir(exist_ok=True)
        Image.new("RGB", size).save(root / "images" / name)
    return mutate


def append(key, entry):
    return lambda coco, root: coco[key].append(entry)


def listed_file_missing(coco, root):
    coco["images"].append({"id": 3, "file_name": "gone.png", "width": W, "height": H})


PROBLEMS = {
    "missing file": (listed_file_missing, "'gone.png' is missing"),
    "unlisted file": (add_image_file("extra.png"), "'extra.png'"),
    "duplicate id": (append("images", {"id": 1, "file_name": "c.png", "width": W, "height": H}), "duplicate"),
    "duplicate name": (append("images", {"id": 3, "file_name": "a.png", "width": W, "height": H}), "duplicate"),
    "unknown image": (append("annotations", {"id": 8, "image_id": 42, "category_id": 2,
                                             "segmentation": square(0, 0, 2, 2)}), "unknown image_id 42"),
    "unknown category": (append("annotations", {"id": 8, "image_id": 1, "category_id": 77,
                                                "segmentation": square(0, 0, 2, 2)}), "unknown category_id 77"),
    "odd coordinates": (set_in(["annotations", 0, "segmentation"], [[0, 0, 3, 0, 3]]), "5 coordinates"),
    "two points": (set_in(["annotations", 0, "segmentation"], [[0, 0, 3, 3]]), "4 coordinates"),
    "outside": (set_in(["annotations", 1, "segmentation"], [[0, 0, W + 3, 0, 0, 4]]), "3.0 px outside"),
    "rle size": (set_in(["annotations", 0, "segmentation"], {"size": [4, 4], "counts": [16]}), "RLE size"),
    "rle counts sum": (set_in(["annotations", 0, "segmentation"], {"size": [H, W], "counts": [3, 4]}),
                       f"sum to {W * H}"),
    "rle junk": (set_in(["annotations", 0, "segmentation"], {"size": [H, W], "counts": "zz!!"}),
                 "not a valid compressed RLE"),
    "duplicate category": (append("categories", {"id": 7, "name": "door"}), "category id 7 ('door')"),
    "dotdot name": (set_in(["images", 0, "file_name"], "../a.png"), "'../a.png' must be a relative path inside"),
    "absolute name": (set_in(["images", 0, "file_name"], "/etc/a.png"), "inside"),
    "no width": (lambda coco, root: coco["images"][0].pop("width"), "width/height"),
    "zero height": (set_in(["images", 0, "height"], 0), "width/height"),
    "real size differs": (add_image_file("a.png", (W + 1, H)), "11x8, listed 10x8"),
}


@pytest.mark.parametrize("name", PROBLEMS)
def test_each_problem_is_reported(tmp_path, name):
    mutate, expected = PROBLEMS[name]
    coco = base_coco()
    annotations, image_dir = write_coco(tmp_path, coco)
    if name in ("dotdot name", "absolute name"):
        (image_dir / "a.png").unlink()   # else a.png would also (rightly) be reported as unlisted
    mutate(coco, tmp_path)
    annotations.write_text(json.dumps(coco))
    _, _, problems = read_coco(annotations, image_dir)
    assert len(problems) == 1 and expected in problems[0], problems
    assert str(annotations) in problems[0]


def test_all_problems_are_reported_in_one_call(tmp_path):
    coco = base_coco()
    annotations, image_dir = write_coco(tmp_path, coco)
    chosen = ["missing file", "unlisted file", "unknown category", "outside", "zero height"]
    for name in chosen:
        PROBLEMS[name][0](coco, tmp_path)
    annotations.write_text(json.dumps(coco))
    _, _, problems = read_coco(annotations, image_dir)
    assert len(problems) == len(chosen)
    for name in chosen:
        assert any(PROBLEMS[name][1] in p for p in problems), (name, problems)


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"images": [], "annotations": []}),
                                  json.dumps({"images": [1], "annotations": [], "categories": []})])
def test_non_coco_file_raises_at_once(tmp_path, text):
    (tmp_path / "annotations.json").write_text(text)
    with pytest.raises(ValueError, match="annotations.json"):
        read_coco(tmp_path / "annotations.json", tmp_path)


def test_pycocotools_prints_nothing(tmp_path, capfd):
    items, _, _ = read(tmp_path, base_coco())
    items[0][1].rasterize()
    assert capfd.readouterr() == ("", "")


def save(tmp_path, values, mode, palette_colours=None):
    path = tmp_path / f"mask_{mode}.png"
    img = Image.fromarray(np.array(values, np.uint8)).convert(mode) if mode != "I;16" else \
        Image.fromarray(np.array(values, np.uint16))
    if palette_colours is not None:
        img.putpalette(palette_colours)
    img.save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_load_class_mask_grey(tmp_path, mode):
    values = [[0, 1, 2], [2, 1, 0]]
    mask = load_class_mask(save(tmp_path, values, mode), 3)
    assert mask.dtype == np.uint8 and np.array_equal(mask, values)


def test_load_class_mask_palette_indices_not_colours(tmp_path):
    # Index 1 is drawn white and index 2 black: the classes must still be 1 and 2.
    path = save(tmp_path, [[0, 1], [2, 1]], "P", [0, 0, 0, 255, 255, 255, 0, 0, 0])
    assert Image.open(path).mode == "P"
    assert np.array_equal(load_class_mask(path, 3), [[0, 1], [2, 1]])


def test_load_class_mask_refuses_out_of_range(tmp_path):
    path = save(tmp_path, [[0, 255, 255], [19, 1, 0]], "L")
    with pytest.raises(ValueError, match=r"mask_L\.png.*19 \(1 px\), 255 \(2 px\).*3 pixels"):
        load_class_mask(path, 19)


def test_load_class_mask_refuses_colour_and_garbage(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4)).save(rgb)
    with pytest.raises(ValueError, match="rgb.png.*mode RGB"):
        load_class_mask(rgb, 3)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="junk.png"):
        load_class_mask(junk, 3)


def test_read_class_names(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# parts\nbackground\n\n  door \nmirror\n")
    assert read_class_names(path) == ["background", "door", "mirror"]


@pytest.mark.parametrize("text, message", [("", "at least one"), ("# only\n\n", "at least one"),
                                           ("background\n", "at least one"),
                                           ("background\ndoor\ndoor\n", "duplicate.*door")])
def test_read_class_names_errors(tmp_path, text, message):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"classes.txt.*{message}"):
        read_class_names(path)


def test_flip_permutation_car_parts():
    names = [BACKGROUND] + CAR_PARTS
    perm = flip_permutation(names)
    assert perm.dtype == np.int64 and len(perm) == 19
    mirrored = {names[i]: names[perm[i]] for i in range(19)}
    assert mirrored["front_left_door"] == "front_right_door"
    assert mirrored["back_right_light"] == "back_left_light"
    assert mirrored["left_mirror"] == "right_mirror" and mirrored["right_mirror"] == "left_mirror"
    for name in (BACKGROUND, "wheel", "hood", "trunk", "front_bumper"):
        assert mirrored[name] == name
    assert np.array_equal(perm[perm], np.arange(19))
    mask = np.array([[names.index("front_left_door"), names.index("hood")]], np.uint8)
    assert [names[c] for c in perm[mask[:, ::-1]][0]] == ["hood", "front_right_door"]


def test_flip_permutation_tokens_and_case():
    perm = flip_permutation(["bg", "Left Door", "Right Door", "LEFT-arm", "RIGHT-arm", "leftover"])
    assert perm.tolist() == [0, 2, 1, 4, 3, 5]   # 'leftover' is not the token 'left'


def test_flip_permutation_without_partner_raises():
    with pytest.raises(ValueError, match="'back_left_door'.*'back_right_door'"):
        flip_permutation([BACKGROUND, "back_left_door", "wheel"])


@pytest.mark.parametrize("n", [1, 19, 256])
def test_palette(n):
    colours = palette(n)
    assert colours.dtype == np.uint8 and colours.shape == (n, 3)
    assert colours[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in colours.tolist()}) == n
    assert np.array_equal(colours, palette(n))


@pytest.mark.slow
def test_real_car_parts(carparts_dir):
    items, names, problems = read_coco(carparts_dir / "annotations.json", carparts_dir / "JPEGImages")
    assert problems == [] and len(items) == 400
    assert names == [BACKGROUND] + CAR_PARTS
    counts = np.zeros(len(names), np.int64)
    for path, shapes in items:
        mask = shapes.rasterize()
        assert mask.shape == (512, 512) and path.is_file()
        counts += np.bincount(mask.ravel(), minlength=len(names))
    fractions = counts / counts.sum()
    assert 0.4 < fractions[0] < 0.9   # background is most of each photo, but not all of it
    assert (fractions[1:] > 0).all(), dict(zip(names, fractions))   # every part appears somewhere
    assert sum(len(np.unique(shapes.rasterize())) > 3 for _, shapes in items[:5]) >= 4
