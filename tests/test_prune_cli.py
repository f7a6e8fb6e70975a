"""``usn-offline prune`` and ``usn-offline compare`` on the tiny dataset."""

from __future__ import annotations

import json

import pytest

from usn_offline.cli import main


def test_prune_writes_a_smaller_loadable_checkpoint(tiny_dataset, tiny_checkpoint, tmp_path, capsys, device):
    from usn_offline.models import count_parameters
    from usn_offline.train import load_checkpoint

    out = tmp_path / "pruned.pt"
    code = main(["prune", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset), "--ratio", "0.4",
                 "--rounds", "2", "--score-images", "8", "--device", device, "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "round" in printed and "PCK@2px" in printed and "pruned checkpoint written to" in printed
    pruned, info = load_checkpoint(out)
    original, _ = load_checkpoint(tiny_checkpoint)
    assert count_parameters(pruned) < count_parameters(original)
    assert info.training["pruning"]["config"]["method"] == "usn-wd"
    assert len(info.training["pruning"]["rounds"]) == 3
    # The pruned checkpoint goes on through the rest of the pipeline.
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(tiny_dataset), "--device", device]) == 0


def test_compare_writes_table_json_and_plot(tiny_dataset, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset),
                 "--methods", "none", "random", "usn-wd", "--ratios", "0.5", "--rounds", "1",
                 "--score-images", "8", "--num-images", "2", "--eps", "0.002", "0.005", "0.01",
                 "--delta", "40", "--device", "cpu", "--out", str(out), "--quiet", "--workers", "2"])
    assert code == 0  # each model's images certified on 2 Ray workers
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| method | ratio | params")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["none", "random", "usn-wd"]
    record = json.loads((out / "results.json").read_text())
    assert record["schema_version"] == 1
    rows = record["rows"]
    assert rows[0]["parameters"] > rows[1]["parameters"]
    for row in rows:
        assert set(row["certified"]) == {"0.002", "0.005", "0.01"}
        assert all(0.0 <= v <= 1.0 for v in row["certified"].values())
        assert row["verify_seconds_mean"] > 0
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "usn-wd-0.5.pt").is_file() and (out / "unpruned.pt").is_file()
    assert "comparison written to" in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragment", [
    (["--ratio", "1.5"], "ratio must be in [0, 1), got 1.5"),
    (["--rounds", "0"], "expected a positive integer, got 0"),
    (["--method", "l1"], "invalid choice: 'l1'"),
])
def test_prune_bad_arguments(argv, fragment, tiny_dataset, tiny_checkpoint, tmp_path, capsys):
    base = ["prune", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset), "--out",
            str(tmp_path / "p.pt"), "--quiet"]
    try:
        code = main(base + argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err.splitlines()[-1]  # one error line (argparse prints its usage above it)
    assert not (tmp_path / "p.pt").exists()


def test_prune_resume_keeps_an_up_to_date_result(tiny_dataset, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned.pt"
    base = ["prune", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset), "--rounds", "1",
            "--score-images", "8", "--device", "cpu", "--out", str(out), "--quiet", "--resume"]
    assert main(base + ["--ratio", "0.3"]) == 0
    written = out.stat().st_mtime_ns
    capsys.readouterr()
    assert main(base + ["--ratio", "0.3"]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == written
    assert main(base + ["--ratio", "0.4"]) == 0  # other settings: pruned again
    assert "pruned checkpoint written to" in capsys.readouterr().out
    assert out.stat().st_mtime_ns != written
