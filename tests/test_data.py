"""Finding, reading, checking and splitting image/mask pairs."""

from pathlib import Path

import numpy as np
import pytest

from data_cil import (Pair, binary_mask, class_mask, find_pairs, find_test_images, fold_assignment,
                      load_pairs, parse_palette, read_image, split_pairs)
from io_cil import InputError, write_json_once
from tests.conftest import TINY, cli, make_pair, rgb, road_mask, save


def test_pairs_are_matched_by_name_whatever_the_extension(tmp_path):
    make_pair(tmp_path, "b.png", rgb(), road_mask())
    save(tmp_path / "training/images/a.jpg", rgb())
    save(tmp_path / "training/groundtruth/a.png", road_mask())
    (tmp_path / "training/images/notes.txt").write_text("not an image")
    pairs = find_pairs(tmp_path)
    assert [(p.image.name, p.mask.name) for p in pairs] == [("a.jpg", "a.png"), ("b.png", "b.png")]


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "training/images: folder not found; pass --data-dir"),
    (lambda root: (root / "training/images").mkdir(parents=True), "no images"),
    (lambda root: (save(root / "training/images/x.png", rgb()),
                   save(root / "training/groundtruth/y.png", road_mask())),
     "x.png has no mask of the same name"),
])
def test_missing_folders_and_unmatched_files_are_named(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(InputError, match=message):
        find_pairs(tmp_path)


def test_a_mask_without_image_is_named(tmp_path):
    make_pair(tmp_path, "a.png", rgb(), road_mask())
    save(tmp_path / "training/groundtruth/orphan.png", road_mask())
    with pytest.raises(InputError, match="orphan.png has no image of the same name"):
        find_pairs(tmp_path)


def test_real_mask_values_binarise_at_128():
    mask = np.array([[0, 118, 127], [128, 237, 255]], np.uint8)
    assert binary_mask(mask, "m.png").tolist() == [[0, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize("top, classes", [(1, 2), (2, 3), (7, 8)])
def test_a_mask_of_class_numbers_is_refused_as_binary_naming_enough_classes(top, classes):
    with pytest.raises(InputError, match=f"values are 0..{top}, all below the threshold 128.*"
                                         f"pass --classes {classes} if"):
        binary_mask(np.array([[0, 1], [top, 0]], np.uint8), "m.png")


def test_grey_and_rgba_images_become_rgb_with_a_note_unless_opaque(tmp_path):
    grey = save(tmp_path / "grey.png", rgb()[..., 0])
    alpha = np.full((32, 32), 255, np.uint8)
    opaque = save(tmp_path / "opaque.png", np.dstack([rgb(), alpha]))
    alpha[0, 0] = 254
    rgba = save(tmp_path / "rgba.png", np.dstack([rgb(), alpha]))
    notes = {}
    assert read_image(grey, notes).shape == (32, 32, 3)
    assert np.array_equal(read_image(opaque, notes), rgb())
    assert np.array_equal(read_image(rgba, notes), rgb())
    assert notes == {"grey images converted to RGB": ["grey.png"],
                     "RGBA images converted to RGB, transparency dropped": ["rgba.png"]}


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty \\(0 bytes\\)"),
    (b"not a png at all", "cannot read the image"),
])
def test_unreadable_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"bad.png: {message}"):
        read_image(path)


def test_a_truncated_png_is_named(tmp_path):
    path = save(tmp_path / "cut.png", rgb(64))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="cut.png: cannot read the image"):
        read_image(path)


def test_a_mask_of_another_size_is_named(tmp_path):
    make_pair(tmp_path, "a.png", rgb(32), road_mask(16))
    with pytest.raises(InputError, match="a.png: mask is 16x16 but its image is 32x32"):
        load_pairs(find_pairs(tmp_path))


def test_index_masks_check_their_classes():
    mask = np.array([[0, 1], [2, 7]], np.uint8)
    with pytest.raises(InputError, match="mask value 7 is no class of --classes 3"):
        class_mask(mask, "m.png", 3)
    assert class_mask(mask, "m.png", 8).tolist() == [[0, 1], [2, 7]]


def test_colour_masks_map_through_the_palette(tmp_path):
    palette_file = tmp_path / "palette.json"
    palette_file.write_text('{"#000000": 0, "255,0,0": 1, "#00ff00": 2}')
    palette = parse_palette(palette_file)
    mask = np.zeros((2, 2, 3), np.uint8)
    mask[0, 1] = (255, 0, 0)
    mask[1, 1] = (0, 255, 0)
    assert class_mask(mask, "m.png", 3, palette).tolist() == [[0, 1], [0, 2]]
    mask[1, 0] = (1, 2, 3)
    with pytest.raises(InputError, match="colour #010203 is in no class of the palette"):
        class_mask(mask, "m.png", 3, palette)


def test_split_is_deterministic_disjoint_and_ninety_ten():
    pairs = [Pair(f"i{n}.png", f"m{n}.png") for n in range(80)]
    train, valid = split_pairs(pairs, 0.1, seed=3)
    assert (train, valid) == split_pairs(pairs, 0.1, seed=3)
    assert len(train) == 72 and len(valid) == 8
    assert not set(train) & set(valid)
    assert set(train) | set(valid) == set(pairs)
    assert split_pairs(pairs, 0.1, seed=4)[1] != valid


def test_a_split_needs_two_images():
    with pytest.raises(InputError, match="needs at least 2"):
        split_pairs([Pair("a", "b")], 0.1, seed=0)


def test_test_images_are_found_in_both_layouts(tmp_path):
    save(tmp_path / "epfl/test_set_images/test_10/test_10.png", rgb())
    save(tmp_path / "epfl/test_set_images/test_2/test_2.png", rgb())
    save(tmp_path / "cil/test_images/test_7.png", rgb())
    assert [(n, p.name) for n, p in find_test_images(tmp_path / "epfl").items()] == [
        (2, "test_2.png"), (10, "test_10.png")]
    assert list(find_test_images(tmp_path / "cil")) == [7]
    with pytest.raises(InputError, match="no test images"):
        find_test_images(tmp_path)


def test_folds_are_seeded_even_and_stratified_by_foreground():
    foreground = np.random.default_rng(0).random(23) ** 3        # mostly sparse, a few dense
    folds = fold_assignment(foreground, 5, seed=1)
    assert folds == fold_assignment(foreground, 5, seed=1) != fold_assignment(foreground, 5, 2)
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 23
    means = [foreground[np.array(folds) == fold].mean() for fold in range(5)]
    shuffled = np.random.default_rng(1).permutation(23) % 5       # unstratified, for scale
    plain = [foreground[shuffled == fold].mean() for fold in range(5)]
    assert np.ptp(means) < np.ptp(plain)
    with pytest.raises(InputError, match="found 3 image\\(s\\) for --folds 5"):
        fold_assignment([0.1, 0.2, 0.3], 5, seed=0)


def test_a_file_written_once_is_never_replaced(tmp_path):
    assert write_json_once(tmp_path / "c.json", {"a": 1})
    assert not write_json_once(tmp_path / "c.json", {"a": 2})
    assert (tmp_path / "c.json").read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_an_extra_image_with_the_pixels_of_a_data_image_is_refused(workdir, road_dir):
    extra_dir = workdir / "extra"
    for sub in ("training/images", "training/groundtruth"):
        (extra_dir / sub).mkdir(parents=True)
        source = sorted((road_dir / sub).iterdir())[3]
        (extra_dir / sub / "copy.png").write_bytes(source.read_bytes())
    result = cli("--data-dir", road_dir, *TINY, "--extra-data", extra_dir)
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "copy.png" in line and source.name in line
    assert not Path("logs").exists()


def test_the_data_folder_itself_as_extra_data_is_refused_without_asking_to_delete_it(
        workdir, road_dir):
    result = cli("--data-dir", road_dir, *TINY, "--extra-data", road_dir)
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]
    assert "--data-dir itself" in line and "remove" not in line
    assert not Path("logs").exists()


@pytest.mark.parametrize("options, named", [
    (["--extra-data", "nowhere"], "nowhere/training/images: folder not found; pass --extra-data"),
    (["--extra-count", "1"], "--extra-count 1"),
])
def test_extra_data_options_that_cannot_work_are_one_line(workdir, road_dir, options, named):
    result = cli("--data-dir", road_dir, *TINY, *options)
    assert result.exit_code == 2 and named in result.output.strip().splitlines()[-1], result.output
    assert not Path("logs").exists()
