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


def test_demo_pretrain_stage(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "pretrain", "train.progress=false"]) == 0
    assert (out / "base" / "final" / "config.json").exists()
    assert not (out / "report").exists()
