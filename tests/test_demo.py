from mmtune.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--methods", "vanilla,nrca+spider", "train.progress=false",
                 "eval.max_new_tokens=4"]) == 0
    table = (out / "report" / "report.md").read_text()
    assert "| vanilla |" in table and "| nrca+spider |" in table
    assert (out / "report" / "s_vs_g.png").exists()
    # a second call reuses finished runs instead of overwriting them
    assert main(["demo", "--quick", "--out", str(out), "--methods", "vanilla", "train.progress=false"]) == 0
    assert "already done, reusing" in capsys.readouterr().out


def test_demo_on_world_v3_from_a_given_seed(tmp_path):
    """--world 3 takes configs/demo_v3.yaml (world v3's captions); --first-seed names the seeds a process runs."""
    import json

    out = tmp_path / "v3"
    assert main(["demo", "--quick", "--world", "3", "--first-seed", "2", "--out", str(out), "--methods", "vanilla",
                 "train.progress=false", "eval.max_new_tokens=4", "eval.every_steps=null",
                 "eval.heldout=[synthetic:color_vqa]"]) == 0
    assert [p.name for p in out.glob("vanilla-seed*")] == ["vanilla-seed2"]
    assert json.loads((out / "synthetic" / "world.json").read_text())["version"] == 3


def test_demo_pretrain_stage(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "pretrain", "train.progress=false"]) == 0
    assert (out / "base" / "final" / "config.json").exists()
    assert not (out / "report").exists()


def test_demo_merge_reports_merged_models_beside_joint_runs(tmp_path, capsys):
    """--merge: one run per downstream task, each rule's merge evaluated and put on the joint runs' report (with the
    base's scores, so its normalised columns exist); a second call reuses every finished piece."""
    import json

    out = tmp_path / "demo"
    args = ["demo", "--quick", "--merge", "--out", str(out), "--methods", "vanilla", "train.progress=false",
            "eval.max_new_tokens=4", "eval.heldout=[synthetic:color_vqa]"]
    assert main(args) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    labels = {row["method"] for row in report["rows"]}
    assert {"vanilla", "merge: task_arithmetic", "merge: ties", "merge: breadcrumbs",
            "merge: dare_task_arithmetic"} <= labels
    assert (out / "merge" / "count_mc-seed0" / "final" / "config.json").exists()
    assert json.loads((out / "merge" / "ties-seed0" / "merge_recipe.json").read_text())["rule"] == "ties"
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "stage 1" not in printed and "merge, stage 2" not in printed and "already done, reusing" in printed
