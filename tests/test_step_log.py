"""The step log (mmtune.step_log): status lines without progress bars."""



from mmtune.train import train


def test_logs_without_progress_bars_get_status_lines_and_a_closing_summary(tiny_config, capsys):
    run = train(tiny_config("train.max_steps=4"))  # tiny_config sets train.progress=false
    out = capsys.readouterr().out
    assert "step 4/4 (100%)  loss" in out and "s left" in out
    assert f"final model  {run / 'final'}" in out and f"metrics      {run / 'metrics.jsonl'}" in out
