"""A checkpoint save draws no transformers progress bar into drivekd-train's own bar."""

from drivekd.families import Family, load_model
from drivekd.trainer.checkpoint import save_checkpoint


def test_checkpoint_save_prints_no_shard_bar(tiny_models, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    folder = tiny_models / "internvl-student"
    model = load_model(folder)
    processor = Family.from_pretrained(folder).processor
    capfd.readouterr()
    model.save_pretrained(tmp_path / "plain", safe_serialization=True)  # the bar this test keeps out
    assert "Writing model shards" in capfd.readouterr().err
    save_checkpoint(tmp_path / "run", "step-000001", model, processor, {}, {})
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored afterwards
