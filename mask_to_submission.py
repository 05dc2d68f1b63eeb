"""The Kaggle submission CSV from predicted road masks, and patch masks back from a CSV.

    python mask_to_submission.py data/roadseg/submit_output/<run> -o submission.csv
    python mask_to_submission.py --to-masks submission.csv -o masks/

One line per 16x16 patch, `{image number:03d}_{x}_{y},{label}` with x the patch's column and y
its row (top-left pixel), columns in the outer loop, images by number: the order of the
course's own mask_to_submission.py.
"""

import re
from pathlib import Path

import click
import numpy as np

from cli_cil import HELP_OPTIONS, FiniteFloat, OneLineCommand, one_line_errors
from data_cil import IMAGE_EXTENSIONS, NUMBER, image_number, read_array
from io_cil import InputError, writable, write_png, write_text

# The Kaggle facts, here and nowhere else (losses_cil and predict_cil import them).
PATCH_SIZE = 16              # the grader scores 16x16 patches
FOREGROUND_THRESHOLD = 0.25  # a patch is road when its mean mask value exceeds this
HEADER = "id,prediction"
# An id is three whole numbers (data_cil.NUMBER: int() alone would take "+1", " 1" or "١").
PATCH_ID = re.compile(rf"({NUMBER})_({NUMBER})_({NUMBER})")


def mask_fraction(array, path="mask"):
    """A mask file's pixels as 0..1 floats: 0/1 masks as they are, 8-bit ones over 255, 16-bit
    ones over 65535, floats in 0..1 as they are (grey; colour channels averaged, alpha dropped).
    Anything else is InputError: a guessed scale would write a silently wrong CSV."""
    if array.ndim == 3:
        array = array[..., :3 if array.shape[-1] >= 3 else 1].mean(axis=-1).astype(array.dtype)
    if array.dtype == bool or (array.size and array.min() >= 0 and array.max() <= 1):
        return array.astype(np.float64)
    if array.dtype == np.uint8:
        return array / 255
    if array.dtype == np.uint16 and array.max() > 255:
        return array / 65535
    raise InputError(f"{path}: mask values {array.min()}..{array.max()} ({array.dtype}) are "
                     "neither 0/1, 8-bit 0..255, 16-bit 0..65535 nor floats in 0..1; save the "
                     "masks as 8-bit PNGs with road 255")


def patch_means(values, patch_size=PATCH_SIZE, xp=np):
    """The mean of each patch_size x patch_size patch over the last two axes: (H, W) -> (rows,
    cols), or (B, H, W) -> (B, rows, cols). A patch cut short by the bottom or right edge (a side
    that is no multiple of the patch size) averages the pixels it holds, as the course's
    mask_to_submission.py does. `xp` is the array library: NumPy here and in the tables,
    keras.ops in the patch losses and metrics, so the CSV, the reports and training judge every
    patch alike."""
    *batch, height, width = xp.shape(values)
    rows, cols = (height + patch_size - 1) // patch_size, (width + patch_size - 1) // patch_size

    def sums(array):                      # zeros pad the cut patches, which then sum alike
        padded = xp.pad(array, [(0, 0)] * (len(xp.shape(array)) - 2)
                        + [(0, rows * patch_size - height), (0, cols * patch_size - width)])
        blocks = xp.reshape(padded, (-1, rows, patch_size, cols, patch_size))
        return xp.sum(blocks, axis=(2, 4))

    means = sums(values) / sums(xp.ones((height, width)))
    return means if batch else means[0]


def patch_labels(mask, patch_size=PATCH_SIZE, threshold=FOREGROUND_THRESHOLD):
    """(rows, cols) of 0/1: 1 where the patch's mean (0..1) is strictly above `threshold`."""
    return (patch_means(mask, patch_size) > threshold).astype(np.uint8)


def submission_lines(masks, patch_size=PATCH_SIZE, threshold=FOREGROUND_THRESHOLD):
    """CSV lines, header first, for {image number: mask scaled to 0..1}."""
    lines = [HEADER]
    for number in sorted(masks):
        labels = patch_labels(masks[number], patch_size, threshold)
        for col in range(labels.shape[1]):
            for row in range(labels.shape[0]):
                lines.append(f"{number:03d}_{col * patch_size}_{row * patch_size},"
                             f"{labels[row, col]}")
    return lines


def _mask_files(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found; pass the folder holding the masks")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        runs = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = f"; it holds run folders, pass one: {folder / runs[-1]}" if runs else ""
        raise InputError(f"{folder}: no mask images{hint}")
    numbered = {}
    for path in files:
        number = image_number(path)
        if number in numbered:
            raise InputError(f"{path}: image number {number} also in {numbered[number].name}; "
                             "keep one mask per test image")
        numbered[number] = path
    return numbered


def check_output_path(path, force, example="submission.csv"):
    """Refuse a missing folder, a folder as the file (suggesting `example` in it), or an
    existing file unless `force`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; name the file to write, e.g. {path / example}")
    if not path.parent.is_dir():
        raise InputError(f"{path}: folder {path.parent} does not exist; create it or choose "
                         "another output path")
    writable(path.parent, "output folder")             # read-only mounts stop root too
    if path.exists() and not path.is_file():     # a device such as /dev/null, a socket, ...
        raise InputError(f"{path}: exists and is not a regular file; choose another path")
    if path.exists() and not force:
        raise InputError(f"{path}: exists; pass --force to replace it, or choose another path")


def write_submission(csv_path, masks, *, patch_size=PATCH_SIZE, threshold=FOREGROUND_THRESHOLD,
                     force=False):
    """Write the CSV for {image number: mask 0..1} atomically; returns the lines written."""
    check_output_path(csv_path, force)
    lines = submission_lines(masks, patch_size, threshold)
    write_text(csv_path, "\n".join(lines) + "\n")
    return lines


def masks_to_csv(mask_dir, csv_path, *, patch_size=PATCH_SIZE, threshold=FOREGROUND_THRESHOLD,
                 force=False):
    """The CSV for every numbered mask image in `mask_dir`; returns the lines written."""
    masks = {number: mask_fraction(read_array(path), path)
             for number, path in _mask_files(mask_dir).items()}
    return write_submission(csv_path, masks, patch_size=patch_size, threshold=threshold,
                            force=force)


def read_submission(csv_path, patch_size=PATCH_SIZE):
    """{image number: {(x, y): label}} of a submission CSV. A viewing aid, so it keeps the rules
    that make its masks right: every line an id NNN_x_y of whole numbers with x and y on the
    patch grid, and a label 0 or 1; InputError naming the first line that breaks one."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: file not found")
    # utf-8-sig: a spreadsheet's byte order mark is no part of the header; other bytes that
    # are no text fail the header
    lines = csv_path.read_bytes().decode("utf-8-sig", errors="replace").splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise InputError(f"{csv_path}: first line is not '{HEADER}'; is it a submission CSV?")
    patches = {}
    for line_number, line in enumerate(lines[1:], start=2):
        fields = [field.strip() for field in line.split(",")]
        match = PATCH_ID.fullmatch(fields[0]) if len(fields) == 2 else None
        if line.strip() and not (match and fields[1] in ("0", "1")):
            raise InputError(f"{csv_path}:{line_number}: '{line.strip()}' is not "
                             "'NNN_x_y,label' with a label of 0 or 1")
        if match:
            number, x, y = (int(part) for part in match.groups())
            if x % patch_size or y % patch_size:
                raise InputError(f"{csv_path}:{line_number}: '{line.strip()}': x and y must be "
                                 f"multiples of the patch size {patch_size}")
            patches.setdefault(number, {})[(x, y)] = int(fields[1])
    return patches


def csv_to_masks(csv_path, out_dir, *, patch_size=PATCH_SIZE, force=False):
    """One 0/255 patch mask per image of the CSV, mask_NNN.png in `out_dir`; returns the paths."""
    out_dir = Path(out_dir)
    patches = read_submission(csv_path, patch_size)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file; pass a folder for the masks with -o")
    targets = {number: out_dir / f"mask_{number:03d}.png" for number in sorted(patches)}
    odd = [path for path in targets.values() if path.exists() and not path.is_file()]
    if odd:
        raise InputError(f"{odd[0]}: exists and is not a regular file; choose another -o")
    taken = [path for path in targets.values() if path.exists()]
    if taken and not force:
        raise InputError(f"{taken[0]}: exists; pass --force to replace it, or choose another -o")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, labels in sorted(patches.items()):
        path = targets[number]
        height = max(y for _, y in labels) + patch_size
        width = max(x for x, _ in labels) + patch_size
        mask = np.zeros((height, width), np.uint8)
        for (x, y), label in labels.items():
            mask[y:y + patch_size, x:x + patch_size] = 255 * label
        paths.append(write_png(path, mask))
    return paths


@click.command(cls=OneLineCommand, context_settings=HELP_OPTIONS)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="CSV to write, or with --to-masks the folder for the masks.")
@click.option("--to-masks", is_flag=True, help="Render the CSV SOURCE back to patch masks.")
@click.option("--patch-size", type=click.IntRange(min=1), default=PATCH_SIZE, show_default=True,
              help="Side of the square patches the grader scores, in pixels.")
@click.option("--threshold", type=FiniteFloat(0, 1), default=FOREGROUND_THRESHOLD,
              show_default=True, help="A patch is foreground when its mean is above this.")
@click.option("--force", is_flag=True, help="Replace existing output files.")
def main(source, output, to_masks, patch_size, threshold, force):
    """Write the submission CSV for the numbered masks in SOURCE, or masks from a CSV."""
    with one_line_errors():
        if to_masks:
            paths = csv_to_masks(source, output, patch_size=patch_size, force=force)
            click.echo(f"wrote {len(paths)} patch masks to {output}")
        else:
            lines = masks_to_csv(source, output, patch_size=patch_size, threshold=threshold,
                                 force=force)
            road = sum(line.endswith(",1") for line in lines[1:])
            click.echo(f"wrote {output}: {len(lines) - 1} patches, "
                       f"{road / max(1, len(lines) - 1):.1%} road")


if __name__ == "__main__":
    main()
