"""Which models a server loads: both embedded ones by default, else the one named."""

import pytest

from fewstep.server.config import DEFAULT_MODEL_DIR, DEFAULT_VIDEO_MODEL_DIR, load_config


def test_no_model_serves_both_embedded_models_image_first():
    cfg = load_config({}, environ={})
    assert cfg.served_models() == [("fewstep-default", DEFAULT_MODEL_DIR),
                                   ("fewstep-default-video", DEFAULT_VIDEO_MODEL_DIR)]


@pytest.mark.parametrize("overrides, expected", [
    ({"model": "default"}, [("fewstep-default", DEFAULT_MODEL_DIR)]),
    ({"model": "default-video"}, [("fewstep-default-video", DEFAULT_VIDEO_MODEL_DIR)]),
    ({"model_name": "shapes"}, [("shapes", DEFAULT_MODEL_DIR)]),
])
def test_a_named_model_is_served_alone(overrides, expected):
    assert load_config(overrides, environ={}).served_models() == expected


def test_environment_names_the_model(tmp_path):
    cfg = load_config({}, environ={"FEWSTEP_MODEL": str(tmp_path)})
    assert cfg.served_models() == [(tmp_path.name, tmp_path)]


def test_stream_ramp_from_the_flag_else_the_environment():
    from fewstep.server.cli import _serve_overrides, build_parser

    assert load_config({}, environ={}).engine.stream.ramp is None  # the checkpoint's, else full
    assert load_config({}, environ={"FEWSTEP_STREAM_RAMP": "trim"}).engine.stream.ramp == "trim"
    args = build_parser().parse_args(["serve", "--stream-ramp", "jump"])
    assert load_config(_serve_overrides(args), environ={"FEWSTEP_STREAM_RAMP": "trim"}).engine.stream.ramp == "jump"
    with pytest.raises(Exception, match="ramp"):
        load_config({}, environ={"FEWSTEP_STREAM_RAMP": "half"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--stream-ramp", "half"])
