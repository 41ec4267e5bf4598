"""`fewstep serve --engine tensorrt`: says what has been verified, and refuses video models before loading."""

import logging
import subprocess

import pytest

from fewstep.server.app import create_app
from fewstep.server.config import load_config
from fewstep.server.state import ConfigError
from tests.conftest import FEWSTEP


def test_tensorrt_start_up_warns_what_has_run(caplog):
    with caplog.at_level(logging.WARNING, logger="fewstep.server"):
        create_app(load_config({"engine.backend": "tensorrt", "model": "default"}, environ={}))
    (rec,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    msg = rec.getMessage()
    assert "has not run on a GPU" in msg and "9.0" in msg
    for verified in ("engine build on a CPU", "ONNX parity", "onnxruntime", "engine cache"):
        assert verified in msg


def test_other_backends_do_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="fewstep.server"):
        create_app(load_config({"engine.backend": "eager"}, environ={}))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_tensorrt_refuses_a_video_model_in_process():
    with pytest.raises(ConfigError, match="image models only.*--engine eager or --engine compiled"):
        create_app(load_config({"engine.backend": "tensorrt", "model": "default-video"}, environ={}))


def test_serve_tensorrt_with_both_embedded_models_is_a_user_error():
    # no --model: the embedded image and video models; the refusal comes before the server starts
    r = subprocess.run([*FEWSTEP, "serve", "--engine", "tensorrt", "--device", "cpu", "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "TensorRT engine serves image models only" in r.stderr and "fewstep-default-video" in r.stderr
    assert "--engine eager" in r.stderr and "Traceback" not in r.stderr
