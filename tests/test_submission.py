"""The Kaggle CSV: exact lines, order, round trip, every mask encoding, image numbers, several
classes, and refusing to overwrite."""

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import mask_to_submission as m2s
from data_cil import image_number
from io_cil import InputError
from predict_cil import write_test_predictions
from runs_cil import close_run, open_run
from tests.conftest import resolved, save


def mask_with_patch(x, y, size=608):
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + 16, x:x + 16] = 255
    return mask


def test_one_road_patch_gives_exactly_its_line(tmp_path):
    save(tmp_path / "masks/test_7.png", mask_with_patch(16, 32, size=64))
    lines = m2s.masks_to_csv(tmp_path / "masks", tmp_path / "s.csv")
    assert lines[0] == "id,prediction"
    assert "007_16_32,1" in lines
    assert sum(line.endswith(",1") for line in lines) == 1
    assert (tmp_path / "s.csv").read_text().splitlines() == lines


def test_columns_are_the_outer_loop_rows_the_inner():
    lines = m2s.submission_lines({3: np.zeros((32, 48))})
    assert lines[1:] == ["003_0_0,0", "003_0_16,0", "003_16_0,0", "003_16_16,0", "003_32_0,0",
                         "003_32_16,0"]


def test_a_patch_at_exactly_a_quarter_is_background():
    mask = np.zeros((16, 32))
    mask[:4, :16] = 1.0            # mean 0.25: not above the threshold
    mask[:5, 16:] = 1.0            # mean 0.3125
    assert m2s.submission_lines({1: mask})[1:] == ["001_0_0,0", "001_16_0,1"]


def test_a_608_image_gives_1444_lines_and_images_come_by_number(tmp_path):
    for number in (10, 2, 1):
        save(tmp_path / f"masks/test_{number}.png", mask_with_patch(0, 0))
    lines = m2s.masks_to_csv(tmp_path / "masks", tmp_path / "s.csv")
    assert len(lines) == 1 + 3 * 1444
    assert [lines[1 + k * 1444][:3] for k in range(3)] == ["001", "002", "010"]


def test_mask_to_csv_to_mask_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    labels = {n: rng.integers(0, 2, (5, 4)) for n in (4, 9)}
    for number, patch in labels.items():
        save(tmp_path / f"masks/test_{number}.png",
             np.kron(patch, np.ones((16, 16))).astype(np.uint8) * 255)
    m2s.masks_to_csv(tmp_path / "masks", tmp_path / "s.csv")
    paths = m2s.csv_to_masks(tmp_path / "s.csv", tmp_path / "back")
    assert [p.name for p in paths] == ["mask_004.png", "mask_009.png"]
    for number, path in zip(labels, paths):
        back = m2s.mask_fraction(m2s.read_array(path))
        assert np.array_equal(m2s.patch_labels(back), labels[number])


def test_an_existing_csv_is_kept_without_force(tmp_path):
    save(tmp_path / "masks/test_1.png", mask_with_patch(0, 0, size=32))
    csv = tmp_path / "s.csv"
    csv.write_text("earlier work")
    with pytest.raises(InputError, match="s.csv: exists; pass --force"):
        m2s.masks_to_csv(tmp_path / "masks", csv)
    assert csv.read_text() == "earlier work"
    m2s.masks_to_csv(tmp_path / "masks", csv, force=True)
    assert csv.read_text().startswith("id,prediction\n001_0_0,1")


def test_the_cli_reports_and_fails_cleanly(tmp_path):
    save(tmp_path / "out/run1/test_1.png", mask_with_patch(0, 0, size=32))
    runner = CliRunner()
    result = runner.invoke(m2s.main, [str(tmp_path / "out"), "-o", str(tmp_path / "s.csv")])
    assert result.exit_code == 2
    assert "no mask images; it holds run folders, pass one" in result.output
    result = runner.invoke(m2s.main, [str(tmp_path / "out/run1"), "-o", str(tmp_path / "no/s.csv")])
    assert result.exit_code == 2 and "folder" in result.output and "does not exist" in result.output
    result = runner.invoke(m2s.main, [str(tmp_path / "out/run1"), "-o", str(tmp_path / "s.csv")])
    assert result.exit_code == 0
    assert "4 patches, 25.0% road" in result.output
    result = runner.invoke(m2s.main, ["--to-masks", str(tmp_path / "s.csv"), "-o",
                                      str(tmp_path / "back")])
    assert result.exit_code == 0 and (tmp_path / "back/mask_001.png").is_file()


def test_patch_means_average_partial_edge_patches_like_the_courses_script():
    mask = np.zeros((20, 40))
    mask[16:, 32:] = 1.0                                  # the 4x8 corner patch, all road
    means = m2s.patch_means(mask)
    assert means.shape == (2, 3) and means[1, 2] == 1.0 and means.sum() == 1.0


def test_a_non_ascii_digit_is_no_image_number_in_either_direction(tmp_path):
    save(tmp_path / "masks/test_\u0661.png", mask_with_patch(0, 0, size=32))   # Arabic-Indic 1
    with pytest.raises(InputError, match="not a numbered image name"):
        m2s.masks_to_csv(tmp_path / "masks", tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()
    csv = tmp_path / "back.csv"
    csv.write_text("id,prediction\n\u0661_0_0,1\n")
    runner = CliRunner()
    result = runner.invoke(m2s.main, ["--to-masks", str(csv), "-o", str(tmp_path / "back")])
    assert result.exit_code == 2 and not (tmp_path / "back").exists()


# ---------------------------------------------------------------------------------------------
# Every mask encoding, image numbers, several classes, the CSV's place


def road_at(value, dtype, x=16, y=32, size=64):
    mask = np.zeros((size, size), dtype)
    mask[y:y + 16, x:x + 16] = value
    return mask


@pytest.mark.parametrize("mask", [road_at(1, np.uint8), road_at(255, np.uint8),
                                  road_at(237, np.uint8), road_at(65535, np.uint16),
                                  road_at(True, bool), road_at(1.0, np.float32)])
def test_every_common_mask_encoding_gives_the_same_csv(tmp_path, mask):
    fraction = m2s.mask_fraction(mask, "m.png")
    lines = m2s.submission_lines({7: fraction})
    assert [line for line in lines if line.endswith(",1")] == ["007_16_32,1"]


@pytest.mark.parametrize("mask", [road_at(200, np.uint16), road_at(3.0, np.float32),
                                  road_at(-1, np.int16)])
def test_a_mask_of_unknown_scale_is_refused(mask):
    with pytest.raises(InputError, match="m.png: mask values .* save the masks as 8-bit PNGs"):
        m2s.mask_fraction(mask, "m.png")


@pytest.mark.parametrize("name, number", [("test_5.png", 5), ("test_012.png", 12),
                                          ("satImage_001.png", 1), ("mask_044.png", 44)])
def test_image_numbers_come_from_the_documented_pattern(name, number):
    assert image_number(name) == number


@pytest.mark.parametrize("name", ["test_5_v2.png", "test5.png", "5.png", "test_.png"])
def test_other_names_are_refused_not_guessed(name):
    with pytest.raises(InputError, match="not a numbered image name; name it like test_12.png"):
        image_number(name)


def red_is_class_1(classes):
    """A model that predicts class 1 where the red channel is bright, class 0 elsewhere."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    layer = keras.layers.Conv2D(classes, 1, activation="softmax")
    outputs = layer(x)
    kernel = np.zeros((1, 1, 3, classes), np.float32)
    kernel[0, 0, 0, 1] = 40
    bias = np.zeros(classes, np.float32)
    bias[1] = -20
    layer.set_weights([kernel, bias])
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("classes", [2, 3])
def test_a_two_class_submission_writes_the_csv_of_class_1(tmp_path, classes, capsys):
    image = np.zeros((64, 64, 3), np.uint8)
    image[32:48, 16:32, 0] = 255
    tests = {3: save(tmp_path / "test_images/test_3.png", image)}
    run, _ = open_run(tmp_path / "logs", "r", tmp_path / "valid", tmp_path / "submit")
    settings = resolved("--classes", classes, "--tta", "1")
    summary = write_test_predictions([red_is_class_1(classes)], settings, run, tests)
    close_run(run)
    output = capsys.readouterr().out
    if classes == 2:
        lines = (run.submit_dir / "submission.csv").read_text().splitlines()
        assert [line for line in lines if line.endswith(",1")] == ["003_16_32,1"]
        assert "of them class 1" in output and summary["csv_lines"] == 16
    else:
        assert not (run.submit_dir / "submission.csv").exists()
        assert "no Kaggle CSV: it scores one foreground class and the model has 3" in output


def test_the_converter_refuses_a_folder_as_its_csv(tmp_path):
    save(tmp_path / "masks/test_1.png", road_at(255, np.uint8))
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(m2s.main, [str(tmp_path / "masks"), "-o", str(tmp_path / "out"),
                                           "--force"])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'out'}: is a folder; name the file to " \
                            f"write, e.g. {tmp_path / 'out/submission.csv'}\n"
