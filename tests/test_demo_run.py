"""`mass demo --quick` end to end through the `mass eval` engine: every row, the regime check, the report."""
import json

from mass.tools.cli.main import main


def test_quick_demo_writes_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "normalised" in printed and "Regime criteria" in printed
    report = json.loads((out / "results.json").read_text())
    run = report["runs"][0]
    result = run["result"]
    assert result["rows"] == ["individual", "zero_shot", "task_arithmetic", "ties", "tsv", "mass[paper]",
                              "mass[top1]", "mass[recommended]", "mass[energy]", "mass[few-example]",
                              "mass[few-example-last]", "mass[fast]", "mass_oracle"]
    assert "from the support data" in result["config"]["support"]  # calibrated on training images, not test
    assert all(abs(v - 1.0) < 1e-12 for v in result["normalized"]["individual"].values())
    # the regime verdict is the stated criteria applied to the reported numbers
    ind = result["accuracy"]["individual"]
    g = run["regime"]
    assert g["individual_mean"] == sum(ind.values()) / len(ind) and g["individual_task_min"] == min(ind.values())
    assert g["zero_shot_normalised"] == result["normalized_average"]["zero_shot"]
    c = report["criteria"]
    assert g["holds"] == (g["individual_mean"] >= c["individual_mean_min"] and g["individual_task_min"] >=
                          c["individual_task_min"] and g["zero_shot_normalised"] <= c["zero_shot_normalised_max"])
    if not report["regime_holds"]:
        assert "criteria NOT met" in printed and "smoke run" in printed
    for router in ("paper", "top1", "recommended", "energy", "few-example", "few-example-last", "fast"):
        assert 0.0 <= report["summary"][f"mass[{router}]"]["avg_routing"] <= 1.0
        assert result["latency"][router]["ratio"] > 0
    assert result["storage_factor"] > 1.0
    for name in ("results.md", "accuracy.png", "seed0/routing_confusion_paper.png"):
        assert (out / name).stat().st_size > 0
