"""End to end: configs/*.py -> data -> one train + eval step of a tiny net, on tfds mock data,
for each dataset and eval protocol (the view groups reach the trainer's eval step)."""

import importlib.util
import json
import math
import pathlib

import pytest

tfds = pytest.importorskip("tensorflow_datasets")
loop = pytest.importorskip("resnet_jax.train.loop")

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(family, arch):
    spec = importlib.util.spec_from_file_location(f"configs_{family}", CONFIGS / f"{family}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arch)


@pytest.mark.slow
@pytest.mark.parametrize("family,arch,protocols", [
    ("cifar10", "resnet20", ("center",)),
    # one training step, then its checkpoint under each test protocol of Tables 2-4 (--mode eval)
    ("imagenet", "resnet18", ("center", "ten_crop", "multi_scale")),
])
def test_train_and_eval_step_on_mock_data(tmp_path, family, arch, protocols):
    from resnet_jax.train.evaluate import evaluate_checkpoint

    c = load_config(family, arch)
    c.model_kwargs.width = 4
    c.batch_size, c.eval_batch_size = 4, 4
    c.num_epochs, c.num_train_steps = -1.0, 1
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 1
    c.lr_boundaries_unit, c.lr_boundaries = "steps", (1, 2)
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.eval_protocol = protocols[0]
    if family == "imagenet":  # the §3.4 recipe at toy sizes
        c.data.update(dict(image_size=32, eval_resize=36, scale_range=(32, 40),
                           multi_scale_sizes=(32, 48)))
    with tfds.testing.mock_data(num_examples=6):
        out = loop.train_and_evaluate(c, str(tmp_path / "run"))
        assert math.isfinite(out["train_loss"]) and math.isfinite(out["test_loss"])
        assert 0.0 <= out["test_error"] <= 1.0
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
        assert any("test_error" in row for row in rows)
        for protocol in protocols[1:]:
            c.data.eval_protocol = protocol
            other = evaluate_checkpoint(c, str(tmp_path / "run"))
            assert other["step"] == 1 and math.isfinite(other["test_loss"]), protocol
            assert 0.0 <= other["test_error"] <= 1.0, protocol
