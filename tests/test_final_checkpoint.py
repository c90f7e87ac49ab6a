"""final/ of a run is a drop-in checkpoint: the student's transformers processor class, loadable by
AutoModelForImageTextToText, the trained weights, and no optimizer state."""

import json
import shutil

import pytest
import torch
from PIL import Image

from drivekd.errors import DriveKDError
from drivekd.families import Family
from drivekd.families.processors import HF_PROCESSOR_CLASSES, save_processor, video_free_class
from drivekd.trainer.checkpoint import STATE_PT, list_checkpoints, load_state
from drivekd.trainer.loop import Dist, Trainer
from drivekd.trainer.plan import validate
from drivekd.trainer.settings import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HF_NAMES = {"internvl": "InternVLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def _as_hf_download(src, dst, hf_name):
    """A copy of a tiny student whose processor files name the transformers class, as real `-hf`
    and Qwen checkpoints do (the tiny builder writes drivekd's video-free class name)."""
    shutil.copytree(src, dst)
    for name in ("processor_config.json", "tokenizer_config.json"):
        cfg = json.loads((dst / name).read_text())
        cfg["processor_class"] = hf_name
        (dst / name).write_text(json.dumps(cfg))
    return dst


def _image_inputs(processor):
    image = Image.new("RGB", (160, 90), (30, 140, 200))
    image.paste((220, 40, 10), (20, 10, 90, 60))
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is ahead?"}]}]
    return processor.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt")


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_final_is_a_drop_in_checkpoint(family, tiny_models, demo_data, tmp_path):
    from transformers import AutoModelForImageTextToText

    hf_name = HF_NAMES[family]
    student = _as_hf_download(tiny_models / f"{family}-student", tmp_path / "student", hf_name)
    cfg = TrainConfig(student=student, data=demo_data / "train.json", out=tmp_path / "run", recipe="sft", num_workers=0,
                      progress=False, max_steps=2, grad_accum=1, micro_batch=1, save_every=1, lr=1e-3, warmup_ratio=0.0)
    plan = validate(cfg)
    trainer = Trainer(plan, plan.source, Dist("cpu"))
    final = trainer.run().final
    trained = trainer.model.eval()

    # The student's processor class, in every file that names one; no optimizer state in final/,
    # while the step checkpoints keep theirs (a run resumes from those).
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((final / name).read_text())["processor_class"] == hf_name, name
    assert not (final / STATE_PT).exists()
    steps = list_checkpoints(tmp_path / "run")
    assert [s for s, _ in steps] == [1, 2] and "optimizer" in load_state(steps[-1][1])
    with pytest.raises(DriveKDError, match="step-NNNNNN"):
        load_state(final)

    # As a user's machine loads it: the named transformers class (built here without its video
    # processor, which needs torchvision) and the Auto model class.
    processor = video_free_class(json.loads((final / "processor_config.json").read_text())["processor_class"]).from_pretrained(final)
    assert isinstance(processor, HF_PROCESSOR_CLASSES[type(processor)])
    model = AutoModelForImageTextToText.from_pretrained(final, local_files_only=True).eval()
    assert type(model) is Family.from_pretrained(student).model_class()

    enc = _image_inputs(processor)
    assert "pixel_values" in enc
    original = _image_inputs(Family.from_pretrained(student).processor)  # same tokens and pixels as the student's own
    assert set(enc) == set(original)
    for k in enc:
        assert torch.equal(enc[k], original[k]), k
    with torch.no_grad():
        got = model(**enc).logits
        want = trained(**enc).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # The trained weights, not the student's: two steps at lr 1e-3 moved the logits.
    before = AutoModelForImageTextToText.from_pretrained(student, local_files_only=True).eval()
    with torch.no_grad():
        assert not torch.allclose(before(**enc).logits, got, atol=1e-4)


def test_save_processor_names_the_transformers_class(tiny_models, tmp_path):
    """The tiny builders save drivekd's video-free class; save_processor writes the transformers one."""
    for family, hf_name in HF_NAMES.items():
        proc = Family.from_pretrained(tiny_models / f"{family}-student").processor
        proc.save_pretrained(tmp_path / "plain" / family)
        assert json.loads((tmp_path / "plain" / family / "processor_config.json").read_text())["processor_class"] != hf_name
        save_processor(proc, tmp_path / "ours" / family)
        assert json.loads((tmp_path / "ours" / family / "processor_config.json").read_text())["processor_class"] == hf_name
        assert json.loads((tmp_path / "ours" / family / "tokenizer_config.json").read_text())["processor_class"] == hf_name
