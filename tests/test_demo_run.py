"""`mass demo --quick` end to end: every method row, the router study, and the written report."""
import json

from mass.cli import main


def test_quick_demo_writes_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "| MASS (topk) |" in printed and "normalised" in printed
    report = json.loads((out / "results.json").read_text())
    rows = report["runs"][0]["rows"]
    for name in ("individual (upper bound)", "pretrained + task heads", "task arithmetic (λ=0.3)", "TSV-M",
                 "TIES (density 0.2, λ=1)", "MASS (top1)", "MASS (topk)", "MASS (topk, reuse prefix)"):
        assert name in rows
    assert all(abs(v - 1.0) < 1e-9 for v in rows["individual (upper bound)"]["normalized"].values())
    for name, row in rows.items():
        if name.startswith(("MASS", "router")):
            assert 0.0 <= row["avg_routing"] <= 1.0 and row["latency_ratio"] > 0
    assert report["runs"][0]["storage_factor"] > 1.0
    assert set(report["runs"][0]["routing_per_block"]) == {"cls/merged", "mean/merged", "cls/pretrained",
                                                           "mean/pretrained"}
    for name in ("results.md", "accuracy.png", "routing_per_block.png"):
        assert (out / name).stat().st_size > 0
