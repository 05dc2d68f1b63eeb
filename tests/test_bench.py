"""The benchmark's quick mode: every part runs and the table has every row."""

import json

import pytest
from click.testing import CliRunner

import bench_cil
from model_cil import build_unet
from tests.conftest import one_line_error


def test_flops_are_counted_from_the_convolutions():
    model = build_unet(filters=2, depth=1, batchnorm=False)
    # 16x16 input: 3->2 and 2->2 convs, bottleneck 2->4 and 4->4 at 8x8, transposed 4->2
    # (one 2x2 kernel per 8x8 input position), then 4->2, 2->2 and the 1x1 2->1 at 16x16.
    expected = 2 * (256 * 9 * (3 * 2 + 2 * 2) + 64 * 9 * (2 * 4 + 4 * 4) + 64 * 4 * 4 * 2
                    + 256 * 9 * (4 * 2 + 2 * 2) + 256 * 2 * 1)
    assert bench_cil.forward_flops(model, 16) == expected


@pytest.mark.slow
def test_quick_mode_reports_every_part(workdir):
    result = CliRunner().invoke(bench_cil.main, ["--quick", "-o", "bench.json"])
    assert result.exit_code == 0, result.output
    assert "note: no road pairs in data/roadseg: the pipeline and memory runs use generated " \
           "roads" in result.output
    report = json.loads((workdir / "bench.json").read_text())["results"]
    assert set(report) == {"matmul peak", "unet f=16 (default)", "unet f=64 (classic)",
                           "tiny-unet", "pipeline", "memory", "startup"}
    assert set(report["startup"]) == {"main_cil.py", "grid_cil.py", "mask_to_submission.py"}
    assert report["pipeline"]["mask_values"] == 2
    assert report["pipeline"]["legacy_mask_values"] > 2
    peak = report["matmul peak"]["gflops"] * 1e9
    for label in ("unet f=16 (default)", "unet f=64 (classic)", "tiny-unet"):
        row = report[label]
        # a trained image costs 3x its forward FLOPs; the share is that rate against the peak
        assert row["train_share"] == pytest.approx(
            3 * row["gflops_per_image"] * 1e9 * row["train_images_per_s"] / peak)
    assert report["unet f=64 (classic)"]["params"] == 31_031_745
    assert report["memory"]["peak_mib"] > 100
    assert "| two ImageDataGenerators, one seed, whole images |" in result.output


@pytest.mark.parametrize("data_dir", ["nowhere", "file.txt"])
def test_a_data_folder_given_without_road_pairs_is_refused_not_replaced(workdir, data_dir):
    (workdir / "file.txt").write_text("not a folder")
    result = CliRunner().invoke(bench_cil.main, ["--quick", "--data-dir", data_dir])
    assert result.exit_code == 2 and f"--data-dir {data_dir}" in result.output
    assert "matmul" not in result.output and not (workdir / "bench_results.json").exists()


def test_a_missing_output_folder_is_refused_before_measuring(workdir):
    result = CliRunner().invoke(bench_cil.main, ["--quick", "-o", "missing/bench.json"])
    assert result.exit_code == 2
    assert "missing/bench.json: folder missing does not exist" in result.output
    assert "matmul" not in result.output


def test_the_benchmark_replaces_only_its_own_results(workdir):
    (workdir / "notes.json").write_text('{"mine": 1}')
    result = CliRunner().invoke(bench_cil.main, ["--quick", "--part", "peak", "-o", "notes.json"])
    assert result.exit_code == 2
    one_line_error(result.output, "notes.json", "-o")
    assert (workdir / "notes.json").read_text() == '{"mine": 1}' and "matmul" not in result.output
    for _ in range(2):                                    # its own results: replaced each time
        result = CliRunner().invoke(bench_cil.main, ["--quick", "--part", "peak", "-o", "b.json"])
        assert result.exit_code == 0, result.output
    assert json.loads((workdir / "b.json").read_text())["policy"] == "float32"


@pytest.mark.slow
def test_encoder_and_tile_rows_come_from_their_own_processes(workdir):
    result = CliRunner().invoke(bench_cil.main, ["--quick", "--part", "encoders", "--part",
                                                 "tiles", "-o", "bench.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "bench.json").read_text())["results"]
    assert set(report) == {"encoders", "tiles"}
    row = report["encoders"]["mobilenetv3small"]
    assert row["params"] > row["encoder_params"] > 0 and row["peak_mib"] > 100
    assert set(report["tiles"]) == {"96", "160"}
    assert all(r["tiled_seconds"] > 0 and r["whole_peak_mib"] >= r["tiled_peak_mib"] > 100
               for r in report["tiles"].values())
    assert "| mobilenetv3small |" in result.output and "| 160 |" in result.output
