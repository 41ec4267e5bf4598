import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fewstep.engines.loading import CheckpointError, checkpoint_hash, load_checkpoint, read_index


def _copy(tiny_dir, tmp_path, name="sd_turbo"):
    dst = tmp_path / name
    shutil.copytree(tiny_dir / name, dst)
    return dst


def test_loads_every_component(tiny_dir):
    ck = load_checkpoint(tiny_dir / "sd_turbo")
    assert set(ck.components) == {"unet", "vae", "text_encoder", "tokenizer"}
    assert ck.scheduler_class == "EulerDiscreteScheduler" and ck.denoiser_name == "unet"


def test_missing_directory_is_not_a_hub_lookup(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist .*local directories only"):
        read_index("stabilityai/sd-turbo")


def test_missing_model_index(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        read_index(tmp_path)


def test_missing_component_names_the_folder(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    shutil.rmtree(d / "vae")
    with pytest.raises(CheckpointError, match=r"vae is missing \(model_index.json lists component 'vae'\)"):
        load_checkpoint(d)


def test_missing_weights_name_the_file(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model.safetensors is missing"):
        load_checkpoint(d)


def test_pickled_weights_are_refused(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(f), d / "unet" / "diffusion_pytorch_model.bin")
    f.unlink()
    with pytest.raises(CheckpointError, match="pickled weight file; fewstep loads safetensors only"):
        load_checkpoint(d)


def test_missing_scheduler_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match="scheduler_config.json is missing"):
        load_checkpoint(d)


def test_unknown_class_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    idx = json.loads((d / "model_index.json").read_text())
    idx["unet"] = ["diffusers", "NoSuchUNet"]
    (d / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="NoSuchUNet"):
        load_checkpoint(d)


def test_content_hash_tracks_weights(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    h0 = checkpoint_hash(d)
    assert checkpoint_hash(d) == h0
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    assert checkpoint_hash(d) != h0


@pytest.mark.parametrize("name,upcast", [("sd_turbo", False), ("sdxl_turbo", True)])
def test_vae_upcast_follows_diffusers_pipelines(tiny_dir, name, upcast):
    # AutoencoderKL defaults force_upcast to True; diffusers' SDXL pipeline honours it, its SD pipeline does not.
    from fewstep.engines.pipeline import FewStepPipeline

    pipe = FewStepPipeline(load_checkpoint(tiny_dir / name), dtype=torch.float16)
    assert pipe.vae.config.force_upcast is True
    assert pipe.upcasts_vae(torch.float16) is upcast
    assert pipe.upcasts_vae(torch.float32) is False
    if upcast:
        assert next(pipe.vae.parameters()).dtype == torch.float32


def test_example_prompts_come_from_the_checkpoint(tiny_dir, tmp_path):
    """fewstep.example_prompts reaches the runner's capabilities as given; none when absent; a malformed entry is a
    CheckpointError that says what to write."""
    from fewstep.engines.pipeline import FewStepPipeline

    assert FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit")).capabilities.example_prompts == ()
    d = _copy(tiny_dir, tmp_path, "pixel_dit")
    idx = json.loads((d / "model_index.json").read_text())
    idx["fewstep"]["example_prompts"] = ["a red circle", "a blue square on a navy background"]
    (d / "model_index.json").write_text(json.dumps(idx))
    caps = FewStepPipeline(load_checkpoint(d)).capabilities
    assert caps.example_prompts == ("a red circle", "a blue square on a navy background")
    for bad in ("a red circle", ["a red circle", " "], [3]):
        idx["fewstep"]["example_prompts"] = bad
        (d / "model_index.json").write_text(json.dumps(idx))
        with pytest.raises(CheckpointError, match="example_prompts must be a list of non-empty strings"):
            FewStepPipeline(load_checkpoint(d))


def test_prompt_completion_appends_only_where_the_checkpoint_says(tiny_dir, tmp_path):
    """fewstep.prompt_completion: a prompt without the phrase is encoded as the completed prompt; a prompt with it,
    the empty (unconditional) prompt and negative prompts are not touched; other checkpoints complete nothing; a
    malformed entry is a CheckpointError that says what to write."""
    from fewstep.engines.pipeline import FewStepPipeline

    d = _copy(tiny_dir, tmp_path, "pixel_dit")
    idx = json.loads((d / "model_index.json").read_text())
    idx["fewstep"]["prompt_completion"] = {"unless": r"\bbackground\b", "append": " on a white background"}
    (d / "model_index.json").write_text(json.dumps(idx))
    pipe = FewStepPipeline(load_checkpoint(d))
    assert pipe.complete_prompt("a red circle ") == "a red circle on a white background"
    assert pipe.complete_prompt("a red circle on a navy Background") == "a red circle on a navy Background"
    assert pipe.complete_prompt("") == ""
    short, full = pipe.encode_prompt(["a red circle", "a red circle on a white background"]).embeds
    assert torch.equal(short, full)
    neg = pipe.negative_embeds(["a red circle"]).embeds[0]
    assert not torch.equal(neg, full)
    assert FewStepPipeline(load_checkpoint(tiny_dir / "pixel_dit")).complete_prompt("a red circle") == "a red circle"

    idx["fewstep"]["prompt_completion"] = {"unless": "background"}
    (d / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match='prompt_completion must be {"unless": REGEX, "append": TEXT}'):
        FewStepPipeline(load_checkpoint(d))
