"""mmtune data preview: a training example as the model sees it, from the collator that trains."""

from pathlib import Path

from mmtune.cli import main
from mmtune.config import load_config
from mmtune.data.collate import TrainCollator
from mmtune.data.records import Record
from mmtune.models.tiny import build_tiny
from mmtune.preview import render_example


def test_the_learned_tokens_are_the_answer_and_images_show_their_count():
    """Qwen2-VL's layout: the answer (and the turn's end) inside [[…]], the prompt outside, the image's tokens as one
    run with its count; the ids are the collator's."""
    _, processor = build_tiny("qwen2_vl", words="what colour red".split())
    record = Record(id="a", task="t", kind="open", image=None, prompt="what colour", answers=["red"])
    shown = render_example(TrainCollator(processor), record)
    body = shown.splitlines()[1]
    learned = body[body.index("[[") + 2:body.index("]]")]
    assert learned.startswith("red") and "what colour" in body[:body.index("[[")]
    assert "tokens, " in shown and "input_ids: [" in shown and "label_ids: [-100" in shown


def test_the_command_previews_each_training_task(world, capsys):
    config_path = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert main(["data", "preview", "--config", config_path, f"data.synthetic.dir={world}",
                 "train.progress=false", "--count", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 training example(s) as tiny llava sees them")
    lines = out.splitlines()
    bodies = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("── ")]
    assert len(bodies) == 4 and all("<image>×16" in b and b.index("<image>") < b.index("[[") for b in bodies)
    config = load_config(config_path, [f"data.synthetic.dir={world}"])
    assert "detailed_caption_train.jsonl:1" in out and len(config.data.tasks) == 2
