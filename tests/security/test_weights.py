"""Issue 13, item 9: the trainer never unpickles base weights. A model folder whose UNet ships only a pickled
`diffusion_pytorch_model.bin` (which could run code when loaded) is refused, and the pickle is never opened."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.security


class _Boom:
    def __reduce__(self):  # what a hostile pickle does: call something on load
        return (Path("/nonexistent-dir-skillgen").mkdir, ())


def test_the_trainer_refuses_base_weights_that_are_only_a_pickle(tiny_model, tmp_path):
    import torch

    from trainer.lora import load_components

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    unet = model / "unet"
    for f in unet.glob("*.safetensors"):
        f.unlink()
    (unet / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(Exception, match="safetensors"):
        load_components(model, torch.device("cpu"))
    assert not Path("/nonexistent-dir-skillgen").exists()
