"""Training stages on the CPU with --tiny: export format, resume, distill, tokenizer, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.training import data
from fewstep.training.__main__ import main
from fewstep.training.model import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer, fast_tokenize,
                            scheduler_sigmas, tokenize)

EXPECTED_FILES = {
    "model_index.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fewstep_train")
    assert main(["teacher", "--tiny", "--device", "cpu", "--out", str(out), "--max-steps", "3"]) == 0
    return out


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def _check_format(d: Path, fewstep_steps: int, guidance: float) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel
    from safetensors import safe_open
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    assert _files(d) == EXPECTED_FILES
    idx = json.loads((d / "model_index.json").read_text())
    assert idx["_class_name"] == "FewstepPixelPipeline"
    assert idx["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert idx["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert idx["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    assert idx["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    fs = idx["fewstep"]
    assert fs["default_steps"] == fewstep_steps and fs["default_guidance_scale"] == guidance
    assert fs["default_size"] == 64 and fs["sizes"] == [64] and "distillation" in fs and "teacher_steps" in fs

    for comp, f in (("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        with safe_open(str(d / comp / f), framework="pt") as sf:
            assert all(sf.get_slice(k).get_dtype() == "F16" for k in sf.keys())

    tr = PixArtTransformer2DModel.from_pretrained(str(d / "transformer"))
    te = CLIPTextModel.from_pretrained(str(d / "text_encoder"))
    tok = PreTrainedTokenizerFast.from_pretrained(str(d / "tokenizer"))
    sch = FlowMatchEulerDiscreteScheduler.from_pretrained(str(d / "scheduler"))
    c = tr.config
    assert (c.sample_size, c.in_channels, c.out_channels, c.norm_type) == (64, 3, 3, "ada_norm_single")
    assert c.caption_channels == te.config.hidden_size and not c.use_additional_conditions
    assert c.cross_attention_dim == c.num_attention_heads * c.attention_head_dim
    assert te.config.vocab_size == len(tok) and te.config.max_position_embeddings == tok.model_max_length
    assert (te.config.pad_token_id, te.config.bos_token_id, te.config.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert sch.config.shift == 1.0 and sch.config.num_train_timesteps == 1000

    # the serving loader's call sequence
    tr, te = tr.float().eval(), te.float().eval()
    enc = tok(["a red circle on the left on a white background", ""], padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = te(enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        x = torch.randn(2, 3, 64, 64)
        v = tr(hidden_states=x, encoder_hidden_states=emb, encoder_attention_mask=enc["attention_mask"],
               timestep=torch.tensor([1000.0, 500.0]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_teacher_export_format(run_dir):
    _check_format(run_dir / "teacher", fewstep_steps=25, guidance=4.0)
    assert not list(run_dir.rglob("*.pt")) and not list(run_dir.rglob("*.pkl")) and not list(run_dir.rglob("*.bin"))
    log = [json.loads(x) for x in (run_dir / "teacher_log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log)
    steps = [r for r in log if "loss" in r and "event" not in r]
    assert steps and all(r["grad_norm"] > 0 for r in steps)  # pre-clip norm, logged beside the loss


def test_teacher_resume_continues_step(run_dir):
    st = json.loads((run_dir / "teacher_ckpt" / "state.json").read_text())
    assert st["step"] == 3
    assert all(f.endswith(".safetensors") for f in st["shards"])
    assert main(["teacher", "--tiny", "--device", "cpu", "--out", str(run_dir), "--max-steps", "5", "--resume"]) == 0
    st2 = json.loads((run_dir / "teacher_ckpt" / "state.json").read_text())
    assert st2["step"] == 5 and st2["generation"] > st["generation"]
    log = [json.loads(x) for x in (run_dir / "teacher_log.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 3}.items() <= next(r for r in log if r.get("event") == "resume").items()
    steps_after = [r["step"] for r in log if "loss" in r and r.get("event") is None]
    assert steps_after[-2:] == [4, 5]
    # only the current generation's shards remain
    shards = sorted(p.name for p in (run_dir / "teacher_ckpt").glob("*.safetensors"))
    assert shards == sorted(st2["shards"])
    _check_format(run_dir / "teacher", fewstep_steps=25, guidance=4.0)


def test_distill_tiny_exports_student(run_dir):
    assert main(["distill", "--tiny", "--device", "cpu", "--teacher", str(run_dir / "teacher"),
                 "--out", str(run_dir), "--max-steps", "2"]) == 0
    _check_format(run_dir / "student", fewstep_steps=1, guidance=0.0)
    idx = json.loads((run_dir / "student" / "model_index.json").read_text())
    assert "teacher_guidance_scale" in idx["fewstep"]
    log = [json.loads(x) for x in (run_dir / "distill_log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "guidance_search" for r in log)
    assert any(r.get("event") == "exported" for r in log)


def test_distill_exports_raw_weights_and_extra_emas(tmp_path, run_dir):
    """--export-raw / --extra-emas: one trajectory, three exports; a decay-0 EMA is the raw weights, the default
    EMA (0.999, warmed up as (1 + k) / (10 + k): above 0.3 from step 3) is neither."""
    from safetensors.torch import load_file
    assert main(["distill", "--tiny", "--device", "cpu", "--teacher", str(run_dir / "teacher"), "--guidance", "1",
                 "--out", str(tmp_path), "--max-steps", "6", "--export-raw", "--extra-emas", "0", "0.3"]) == 0

    def weights(name):
        return load_file(str(tmp_path / name / "transformer" / "diffusion_pytorch_model.safetensors"))
    raw, ema0, ema5, ema = (weights(n) for n in ("student_raw", "student_ema0", "student_ema0.3", "student"))
    assert all(torch.equal(raw[k], ema0[k]) for k in raw)
    assert any(not torch.equal(raw[k], ema5[k]) for k in raw) and any(not torch.equal(ema5[k], ema[k]) for k in raw)
    assert json.loads((tmp_path / "student_raw" / "model_index.json").read_text())["fewstep"]["weights"] == "raw weights"


def test_teacher_encoder_options_refuse_a_dit_teacher_before_any_work(run_dir, tmp_path, capsys):
    """--feat / --gan-features need a UNet teacher: a DiT teacher is refused with a message, exit code 2, before the
    CFG search and the pairs (no log written)."""
    assert main(["distill", "--tiny", "--device", "cpu", "--teacher", str(run_dir / "teacher"), "--out", str(tmp_path),
                 "--feat", "1", "--gan", "0.5", "--gan-features"]) == 2
    err = capsys.readouterr().err
    assert "--feat and --gan-features need the teacher UNet's encoder" in err and "drop --feat --gan-features" in err
    log = [json.loads(x) for x in (tmp_path / "distill_log.jsonl").read_text().splitlines()] \
        if (tmp_path / "distill_log.jsonl").exists() else []
    assert not any(r.get("event") == "guidance_search" for r in log)


def test_pack_unpack_roundtrip(run_dir, tmp_path):
    from fewstep.training.pack import pack, unpack
    files = pack(run_dir, tmp_path / "out", ckpt=["teacher"])
    assert len(files) <= 8 and all(f.stat().st_size < 16_000_000 for f in files)
    unpack(tmp_path / "out", tmp_path / "restored")
    assert _files(tmp_path / "restored" / "teacher") == EXPECTED_FILES
    st = json.loads((tmp_path / "restored" / "teacher_ckpt" / "state.json").read_text())
    assert all((tmp_path / "restored" / "teacher_ckpt" / s).exists() for s in st["shards"])


def test_tokenizer_roundtrip_and_padding():
    tok = build_tokenizer(data.vocabulary(), 32)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    words = data.vocabulary()
    ids, mask = tokenize(tok, words)
    assert ids.shape == (len(words), 32) and mask.shape == (len(words), 32)
    for w, row, m in zip(words, ids, mask):
        assert row[0] == BOS_ID and row[2] == EOS_ID and (row[3:] == PAD_ID).all()
        assert row[1] != UNK_ID and tok.decode([int(row[1])]) == w
        assert m.tolist() == [1, 1, 1] + [0] * 29
    # every caption fits with room for <bos>/<eos>
    caps = data.train_prompts(300, seed=1) + data.heldout_prompts(100)
    assert max(len(c.split()) for c in caps) + 2 <= tok.model_max_length
    ids, _ = tokenize(tok, caps)
    assert not (ids == UNK_ID).any()


def test_fast_tokenize_matches_tokenizer():
    tok = build_tokenizer(data.vocabulary(), 32)
    caps = data.train_prompts(100, seed=2) + ["", "A Red zebra", " ".join(["red"] * 40)]
    ref_ids, ref_mask = tokenize(tok, caps)
    ids, mask = fast_tokenize(caps, tok.get_vocab(), tok.model_max_length)
    assert torch.equal(ref_ids, torch.from_numpy(ids)) and torch.equal(ref_mask, torch.from_numpy(mask))


def test_checkpoint_shards_roundtrip(tmp_path, monkeypatch):
    import fewstep.training.common as C
    monkeypatch.setattr(C, "SHARD_BYTES", 300_000)
    t = {f"w{i}": torch.randn(128, 256).half() for i in range(6)}   # 64 KB each
    C.save_checkpoint(tmp_path, "x", t, {"step": 7})
    C.save_checkpoint(tmp_path, "x", t, {"step": 8})
    got, st = C.load_checkpoint(tmp_path, "x")
    assert st["step"] == 8 and st["generation"] == 1 and len(st["shards"]) >= 2
    assert all(torch.equal(got[k], t[k]) for k in t)
    assert sorted(p.name for p in (tmp_path / "x_ckpt").glob("*.safetensors")) == sorted(st["shards"])


def test_sampler_matches_scheduler_convention():
    """Our Euler loop == FlowMatchEulerDiscreteScheduler.step with the same velocity model."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.training.model import ModelConfig, build_model, sample
    cfg = ModelConfig(text_hidden=16, text_layers=1, text_heads=2, text_ff=32, dim=32, heads=2, layers=1, patch=8)
    tok = build_tokenizer(data.vocabulary(), 32)
    torch.manual_seed(0)
    model = build_model(cfg, len(tok)).eval()
    with torch.no_grad():
        for p in model.transformer.proj_out.parameters():
            p.normal_(0, 0.05)   # non-zero output
    ids, mask = tokenize(tok, ["a red circle on a white background"] * 2)
    noise = torch.randn(2, 3, 64, 64)
    for n in (1, 2, 4):
        ours = sample(model, ids, mask, noise, scheduler_sigmas(n))
        sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        sch.set_timesteps(n)
        x = noise.clone()
        with torch.no_grad():
            for t in sch.timesteps:
                v = model(x, (t / 1000.0).expand(2), ids, mask)
                x = sch.step(v, t, x).prev_sample
        assert torch.allclose(ours, x, atol=1e-5), n
    assert scheduler_sigmas(1) == [1.0, 0.0]


def test_flip_augmentation_is_exact():
    """Mirroring an image and swapping left/right in its caption gives a valid sample."""
    import copy

    from fewstep.benchmarks import quality
    from fewstep.training.stream import ReplayBuffer
    rng = np.random.default_rng(5)
    scenes = [data.sample_scene(rng, "train") for _ in range(48)]
    mirrored = copy.deepcopy(scenes)
    for m in mirrored:
        for o in m.objects:
            o.cx = 1.0 - o.cx
        m.gradient = (-m.gradient[0], m.gradient[1])
    a, b = data.render(scenes, 64), data.render(mirrored, 64)
    assert (a.flip(-1) - b).abs().max() < 1e-3
    tok = build_tokenizer(data.vocabulary(), 32)
    caps = [s.caption for s in scenes]
    ids, mask = tokenize(tok, caps)
    buf = ReplayBuffer(64, 64, 32, "cpu", vocab=tok.get_vocab())
    buf.add(a, ids, mask)
    g = torch.Generator().manual_seed(0)
    x, ids2, _ = buf.sample(48, g)
    dec = [tok.decode(r, skip_special_tokens=True) for r in ids2]
    assert set(dec) - set(caps), "no sample was mirrored"   # some captions had left/right swapped
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert quality.adherence(list(u8), dec)["accuracy"] == 1.0


def test_recipe_defaults_sizes_and_edge_loss():
    """The default image recipe (training/README.md; history in docs/default-models.md, "Image recipe") and the size budgets."""
    from fewstep.training.model import DEFAULT_PRESET, PRESETS, build_model
    from fewstep.training.teacher import TeacherArgs, edge_map, weighted_mse
    from fewstep.training.video import DEFAULT_VIDEO_PRESET, VIDEO_PRESETS, build_video_model

    from fewstep.training.distill import DistillArgs

    a = TeacherArgs(out="x")
    assert a.preset == DEFAULT_PRESET == "unet4p" and a.sigma_loc == 0.8 and a.edge_weight == 4.0
    from fewstep.training.__main__ import build_parser
    from fewstep.training.distill import pick_guidance

    d = DistillArgs(teacher="t", out="x")   # the shipped run of 2026-11-30 (docs/default-models.md)
    assert (d.gen_frac, d.p_one, d.compile, d.huber, d.gan, d.dmd) == (0.25, 0.85, False, 1e-3, 0.0, 0.0)
    assert d.cuda_graphs
    cli = build_parser().parse_args(["distill", "--teacher", "t", "--out", "x"])
    assert (cli.huber, cli.gan, cli.p_one, cli.gen_frac, cli.cuda_graphs) == (1e-3, 0.0, 0.85, 0.25, True)
    assert not build_parser().parse_args(["distill", "--teacher", "t", "--out", "x", "--no-cuda-graphs"]).cuda_graphs
    # the shipped run's CFG search on its teacher (12 steps, 256 train-split prompts): the best scale, 3
    rows = [{"guidance": g, "accuracy": a} for g, a in ((2.0, 0.941), (3.0, 0.945), (4.0, 0.9375), (5.0, 0.914))]
    assert pick_guidance(rows) == 3.0 and pick_guidance(rows + [{"guidance": 6.0, "accuracy": 0.945}]) == 3.0
    a_ = build_parser().parse_args(["all", "--out", "x"])   # the one command's stages fit 20 minutes
    assert a_.teacher_minutes + a_.distill_minutes + a_.video_teacher_minutes + a_.video_distill_minutes <= 20.0
    tok = build_tokenizer(data.vocabulary(), 32)
    n_img = sum(p.numel() for p in build_model(PRESETS[DEFAULT_PRESET], len(tok)).parameters())
    n_vid = sum(p.numel() for p in build_video_model(VIDEO_PRESETS[DEFAULT_VIDEO_PRESET], len(tok)).parameters())
    assert 2 * n_img < 12e6 and 2 * n_vid < 8e6 and 2 * (n_img + n_vid) < 20e6   # fp16 bytes
    x, _ = data.sample_batch(np.random.default_rng(0), 8, 64)
    e = edge_map(x)
    assert e.shape == (8, 1, 64, 64) and 0.02 < float((e > 0.5).float().mean()) < 0.3
    flat = torch.full((1, 3, 64, 64), 0.3)
    assert float(edge_map(flat).max()) == 0.0
    v, t = torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64)
    assert torch.allclose(weighted_mse(v, t, x, 0.0), ((v - t) ** 2).mean())
    err = (v - t) ** 2
    w = 1 + 4 * e
    assert torch.allclose(weighted_mse(v, t, x, 4.0), (err * w).mean() / w.mean())


def test_all_runs_both_chains_and_exports_both_students(tmp_path):
    """`fewstep train all` is the one reproducible command: image and video students, both evaluated."""
    out = tmp_path / "all"
    # short budgets: each stage's budget must count from its own start, not from process start (a later stage
    # would otherwise find its minutes spent and export untrained weights)
    assert main(["all", "--tiny", "--device", "cpu", "--out", str(out), "--teacher-minutes", ".3",
                 "--distill-minutes", ".3", "--video-teacher-minutes", ".2", "--video-distill-minutes", ".5"]) == 0
    for stage in ("teacher", "distill", "video_teacher", "video_distill"):
        events = [json.loads(line) for line in (out / f"{stage}_log.jsonl").read_text().splitlines()]
        finished = [e for e in events if e.get("event") == "finished"]
        assert finished and finished[-1]["steps_this_run"] >= 1, (stage, finished)
    for d in ("student", "video_student"):
        assert (out / d / "model_index.json").is_file()
    assert json.loads((out / "video_student" / "model_index.json").read_text())["fewstep"]["kind"] == "video"
    assert (out / "eval.json").is_file() and (out / "video_eval.json").is_file()


def test_eval_walks_the_served_schedule():
    """The held-out eval samples an export on the sigmas the engine serves it with (its flow_sigmas hint): a
    2-step student takes two real steps, not diffusers' default [1, 0.001, 0] (in effect one)."""
    from pathlib import Path

    from fewstep.training.model import served_sigmas, uniform_sigmas

    image = Path(__file__).resolve().parents[3] / "engines" / "default" / "image"
    assert served_sigmas(image, 2) == [1.0, 0.5, 0.0]
    for n in (1, 2, 3, 4, 8):
        assert served_sigmas(image, n) == pytest.approx(uniform_sigmas(n)), n
    assert scheduler_sigmas(2)[1] < 0.01     # what the eval walked before: the second step is a no-op
    assert served_sigmas(image, 25) == pytest.approx(uniform_sigmas(25))  # a teacher's count, beyond MAX_STEPS


@pytest.mark.parametrize("preset,entry", [("tiny_unet", ["diffusers", "UNet2DConditionModel"]),
                                          ("tiny_unetp", ["fewstep", "PositionalUNet2DConditionModel"])])
def test_unet_teacher_exports_and_the_engine_serves_it_as_trained(tmp_path, preset, entry):
    """A UNet denoiser (preset "unet", tiny here; "unetp" with positions in its attention blocks) exports to
    ``unet/`` and the engine's ordinary checkpoint path (its "sd" branch: CLIP without a padding mask, no
    cross-attention mask) samples exactly what the training model samples from the same noise."""
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.pipeline import FewStepPipeline
    from fewstep.training.export import check_export, load_export
    from fewstep.training.model import sample, served_sigmas

    assert main(["teacher", "--tiny", "--preset", preset, "--device", "cpu", "--out", str(tmp_path),
                 "--max-steps", "2"]) == 0
    d = tmp_path / "teacher"
    idx = json.loads((d / "model_index.json").read_text())
    assert idx["unet"] == entry and "transformer" not in idx
    assert check_export(d)["params"]["unet"] > 0
    model, tok, _ = load_export(d, "cpu", torch.float32)
    assert model.denoiser_name == "unet"
    pipe = FewStepPipeline(load_checkpoint(d))
    assert pipe.denoiser_name == "unet" and pipe.default_size == 64
    prompts, seeds = ["a red circle left of a blue square on a white background", "a green star"], [3, 4]
    # the call contract in float: the same text embeddings (all positions, pads included) and the same velocity,
    # for the prompts as the engine completes them ("a green star" names no background: the export's
    # prompt_completion appends one)
    assert pipe.complete_prompt(prompts[1]) == "a green star on a white background"
    ids, mask = tokenize(tok, [pipe.complete_prompt(p) for p in prompts])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = model.encode(ids, mask)
        served = pipe.encode_prompt(prompts)
        assert served.mask is None and torch.allclose(served.embeds.float(), emb, atol=1e-5)
        # a masked encoder (the DiT path) would differ at the padded positions the UNet attends to
        assert not torch.allclose(model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, emb,
                                  atol=1e-3)
        v = model.denoise(x, torch.tensor([0.7, 0.7]), emb, mask)
        v_served = pipe._model(x, 700.0, served, pipe.conditioning(2, 64, 64, 0.0)).float()
        assert torch.allclose(v, v_served, atol=1e-5) and v.abs().max() > 0
    for steps in (1, 2):
        ours_u8 = pipe(prompts, seeds, steps=steps, guidance_scale=0.0).numpy()
        z = torch.cat([torch.randn((1, 3, 64, 64), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
        x = sample(model, ids, mask, z, served_sigmas(d, steps))
        ref_u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.abs(ours_u8.astype(int) - ref_u8.astype(int)).max() <= 1, steps
    # the distill stage keeps the denoiser's kind: a UNet student the engine loads the same way
    assert main(["distill", "--tiny", "--teacher", str(d), "--device", "cpu", "--out", str(tmp_path)]) == 0
    student = FewStepPipeline(load_checkpoint(tmp_path / "student"))
    assert student.denoiser_name == "unet" and student.default_steps == 1
    assert student(prompts[:1], [0]).numpy().shape == (1, 64, 64, 3)


def test_stream_workers_send_what_sample_batch_renders():
    """Data workers send scene arrays instead of scenes; rendering them gives sample_batch's images exactly."""
    from fewstep.training import stream
    tok = build_tokenizer(data.vocabulary(), 32)
    stream._worker_init(dict(tok.get_vocab()), 32, 0.0)
    arrays, caps, ids, mask = stream._scenes_for_step((0, 5, 16, "train"))
    imgs, ref_caps = data.sample_batch(stream.batch_rng(0, 5), 16, 64, "train")
    assert caps == ref_caps
    assert torch.equal(data.render_arrays(arrays, 64), imgs)


def test_distribution_matching_gradient_vanishes_at_the_teacher_and_points_to_it(tmp_path):
    """DMD's term (distill --dmd): zero when the fake score equals the real one, and when the fake network's
    velocity is biased up by c (its clean-image estimate down by t*c) the student's one-step samples are pushed
    up, i.e. its output bias (x = z - v) gets a positive gradient. Then a distill run with the term exports."""
    import copy

    from fewstep.training.distill import DistributionMatching
    from fewstep.training.export import load_export

    assert main(["teacher", "--tiny", "--preset", "tiny_unet", "--device", "cpu", "--out", str(tmp_path),
                 "--max-steps", "2"]) == 0
    teacher, tok, _ = load_export(tmp_path / "teacher", "cpu", torch.float32)
    teacher.requires_grad_(False)
    dm = DistributionMatching(teacher, guidance=1.0, uncond=tokenize(tok, [""]), lr=1e-3, device=torch.device("cpu"),
                              autocast=False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    ids, mask = tokenize(tok, ["a red circle left of a blue square", "a green star at the top"])
    z = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    loss, x, emb = dm.generator_loss(student, z, ids, mask, torch.Generator().manual_seed(1))
    assert float(loss.detach()) == 0.0 and x.shape == z.shape
    with torch.no_grad():
        dm.fake.transformer.conv_out.bias += 0.5
    loss, x, emb = dm.generator_loss(student, z, ids, mask, torch.Generator().manual_seed(1))
    loss.backward()
    assert float(loss.detach()) > 0 and (student.transformer.conv_out.bias.grad > 0).all()
    # the fake network learns the student's samples: its flow-matching loss on a fixed batch goes down
    losses = [float(dm.fake_step(x, emb, mask, torch.Generator().manual_seed(2), 1e-3)) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert main(["distill", "--tiny", "--teacher", str(tmp_path / "teacher"), "--device", "cpu",
                 "--out", str(tmp_path), "--max-steps", "2", "--dmd", "1"]) == 0
    log = [json.loads(x) for x in (tmp_path / "distill_log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "dmd_loss" for r in log)
    idx = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert "distribution matching" in idx["fewstep"]["distillation"]


def test_background_phrase_dropout_is_seeded_and_keeps_the_rest(tmp_path):
    """--drop-background: the caption without " on a BG background" for a seeded share of captions, drawn from its
    own stream, so caption dropout (CFG) keeps its draws; the evaluation's --no-background scores those forms."""
    from fewstep.training.stream import drop_captions

    caps = data.train_prompts(400, seed=3)
    assert data.without_background("a red circle above a blue square on a white background") == \
        "a red circle above a blue square"
    assert data.without_background("a red circle above a blue square") == "a red circle above a blue square"
    out = drop_captions(caps, 0, 7, 0.0, bg_prob=0.25)
    short = [o for o, c in zip(out, caps) if o != c]
    longs = [c for o, c in zip(out, caps) if o != c]
    assert 60 < len(short) < 140 and all(c.startswith(s + " on a ") for s, c in zip(short, longs))
    assert out == drop_captions(caps, 0, 7, 0.0, bg_prob=0.25)
    # CFG dropout draws the same captions whether the background dropout is on or not
    empty_a = [i for i, c in enumerate(drop_captions(caps, 0, 7, 0.1)) if c == ""]
    empty_b = [i for i, c in enumerate(drop_captions(caps, 0, 7, 0.1, bg_prob=0.25)) if c == ""]
    assert empty_a == empty_b and empty_a
    # every stripped caption still parses into the same objects, with no background stated
    from fewstep.benchmarks.quality import parse_caption
    for s in short[:20]:
        spec = parse_caption(s)
        assert spec.background is None and len(spec.objects) >= 1
    # the stages take it: teacher and distill train on both forms, eval scores the stripped prompts
    assert main(["teacher", "--tiny", "--device", "cpu", "--out", str(tmp_path), "--max-steps", "2",
                 "--drop-background", "0.5"]) == 0
    assert main(["distill", "--tiny", "--device", "cpu", "--teacher", str(tmp_path / "teacher"), "--out",
                 str(tmp_path), "--max-steps", "2", "--drop-background", "0.5"]) == 0
    assert main(["eval", "--tiny", "--device", "cpu", "--model", str(tmp_path / "student"), "--steps", "1",
                 "--no-background"]) == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["prompts"] == "heldout_prompts without their background phrase"


def test_adversarial_term_tells_blur_from_sharp_and_weights_itself(tmp_path):
    """distill --gan: the patch discriminator learns to score the procedural images above their blurred copies (the
    failure it is there for), its generator loss sends gradients to the images only, and the adaptive weight is
    the ratio of the two losses' gradient norms at the given layer. Then a tiny distill run with it exports."""
    import torch.nn.functional as F

    from fewstep.training.adversarial import AdversarialLoss, adaptive_weight

    torch.manual_seed(0)
    real, caps = data.sample_batch(np.random.default_rng(0), 32)[:2]
    blurred = F.avg_pool2d(F.pad(real, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    emb = torch.randn(32, 6, 32)
    mask = torch.ones(32, 6, dtype=torch.long)
    adv = AdversarialLoss(32, lr=5e-4, device=torch.device("cpu"), autocast=False, width=16)
    with torch.no_grad():
        before = float((adv.logits(real, emb, mask).mean() - adv.logits(blurred, emb, mask).mean()))
    for _ in range(100):
        d = adv.disc_step(real, blurred, emb, mask)
    with torch.no_grad():
        after = float((adv.logits(real, emb, mask).mean() - adv.logits(blurred, emb, mask).mean()))
    assert after > before + 0.5 and float(d["d_loss"]) < 2.0

    adv.opt.zero_grad(set_to_none=True)
    w = torch.nn.Parameter(torch.ones(3, 1, 1))
    fake = blurred * w
    g = adv.generator_loss(fake, emb, mask)
    assert all(p.grad is None for p in adv.disc.parameters())
    rec = 3.0 * ((fake - real) ** 2).mean()
    gr = torch.autograd.grad(rec, w, retain_graph=True)[0].norm()
    ga = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    assert torch.allclose(adaptive_weight(rec, g, w), gr / (ga + 1e-4))
    g.backward()
    assert w.grad is not None and all(p.grad is None for p in adv.disc.parameters())

    assert main(["teacher", "--tiny", "--preset", "tiny_unet", "--device", "cpu", "--out", str(tmp_path),
                 "--max-steps", "2"]) == 0
    assert main(["distill", "--tiny", "--teacher", str(tmp_path / "teacher"), "--device", "cpu",
                 "--out", str(tmp_path), "--max-steps", "3", "--gan", "0.5", "--huber", "1e-3", "--gan-warmup", "1"]) == 0
    log = [json.loads(x) for x in (tmp_path / "distill_log.jsonl").read_text().splitlines()]
    rows = [r for r in log if r.get("event") == "gan_loss"]
    assert rows and all(np.isfinite([r["g"], r["w"], r["d"]]).all() for r in rows)
    idx = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert "adversarial" in idx["fewstep"]["distillation"]


def test_teacher_feature_discriminator_reads_the_frozen_teacher(tmp_path):
    """distill --gan --gan-features (LADD): logits per encoder level of the teacher UNet; only the heads are
    parameters and only they change in a discriminator step; the teacher's weights get no gradient while the judged
    image does; a tiny distill run with it exports and says so. (Whether the heads learn to see blur is a property of
    a trained teacher's features: on a random tiny teacher, CPU, 100 steps separated blurred from sharp images by
    only 0.15-0.3 logits; that is for the device run to show.)"""
    import copy

    import torch.nn.functional as F

    from fewstep.training.adversarial import AdversarialLoss
    from fewstep.training.model import PRESETS, build_model, build_tokenizer

    torch.manual_seed(0)
    cfg = PRESETS["tiny_unetp"]
    tok = build_tokenizer(data.vocabulary(), cfg.max_length)
    teacher = build_model(cfg, len(tok)).eval().requires_grad_(False)
    real, caps = data.sample_batch(np.random.default_rng(0), 8)[:2]
    blurred = F.avg_pool2d(F.pad(real, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    ids, mask = tokenize(tok, caps)
    with torch.no_grad():
        emb = teacher.encode(ids, mask)
    adv = AdversarialLoss(emb.shape[-1], lr=1e-3, device=torch.device("cpu"), autocast=False,
                          teacher_unet=teacher.transformer)
    levels = len(teacher.transformer.config.block_out_channels) + 1
    assert adv.logits(real, emb, mask).shape == (8, levels, 4, 4)
    n_teacher = sum(p.numel() for p in teacher.transformer.parameters())
    assert 0 < sum(p.numel() for p in adv.params) < n_teacher   # the heads only

    fake = blurred.clone().requires_grad_(True)
    adv.generator_loss(fake, emb, mask).backward()
    assert fake.grad is not None and float(fake.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())

    before_t = copy.deepcopy(teacher.transformer.state_dict())
    before_h = [p.detach().clone() for p in adv.params]
    d = adv.disc_step(real, blurred, emb, mask)
    assert np.isfinite(float(d["d_loss"]))
    assert all(torch.equal(v, teacher.transformer.state_dict()[k]) for k, v in before_t.items())
    assert any(not torch.equal(a, b) for a, b in zip(before_h, adv.params))

    assert main(["teacher", "--tiny", "--preset", "tiny_unetp", "--device", "cpu", "--out", str(tmp_path),
                 "--max-steps", "2"]) == 0
    assert main(["distill", "--tiny", "--teacher", str(tmp_path / "teacher"), "--device", "cpu", "--out",
                 str(tmp_path), "--max-steps", "3", "--gan", "0.5", "--gan-features", "--gan-warmup", "1"]) == 0
    idx = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert "teacher-feature discriminator" in idx["fewstep"]["distillation"]


def test_teacher_feature_distance_is_a_distance_on_the_frozen_teacher(tmp_path):
    """distill --feat: the LPIPS-form distance on the teacher UNet's encoder features is 0 between equal images,
    larger for a shifted copy than for a slightly blurred one, reaches the student's image but not the teacher's
    weights; a tiny distill run with it exports and says so."""
    import torch.nn.functional as F

    from fewstep.training.features import feature_distance
    from fewstep.training.model import PRESETS, build_model, build_tokenizer

    torch.manual_seed(0)
    cfg = PRESETS["tiny_unetp"]
    tok = build_tokenizer(data.vocabulary(), cfg.max_length)
    teacher = build_model(cfg, len(tok)).eval().requires_grad_(False)
    real, caps = data.sample_batch(np.random.default_rng(0), 8)[:2]
    ids, mask = tokenize(tok, caps)
    with torch.no_grad():
        emb = teacher.encode(ids, mask)
    g = torch.Generator().manual_seed(1)
    s = 0.1 + 0.6 * torch.rand(8, generator=g)
    n = torch.randn(real.shape, generator=g)
    unet = teacher.transformer
    same = feature_distance(unet, real.clone(), real, s, n, emb)
    assert same.shape == (8,) and float(same.abs().max()) < 1e-6
    blurred = F.avg_pool2d(F.pad(real, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    shifted = torch.roll(real, 8, dims=3)
    d_blur = feature_distance(unet, blurred, real, s, n, emb)
    d_shift = feature_distance(unet, shifted, real, s, n, emb)
    assert float(d_shift.mean()) > float(d_blur.mean()) > 0

    fake = blurred.clone().requires_grad_(True)
    feature_distance(unet, fake, real, s, n, emb).mean().backward()
    assert fake.grad is not None and float(fake.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())

    assert main(["teacher", "--tiny", "--preset", "tiny_unetp", "--device", "cpu", "--out", str(tmp_path),
                 "--max-steps", "2"]) == 0
    assert main(["distill", "--tiny", "--teacher", str(tmp_path / "teacher"), "--device", "cpu", "--out",
                 str(tmp_path), "--max-steps", "3", "--feat", "1"]) == 0
    idx = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert "teacher-feature perceptual distance (weight 1)" in idx["fewstep"]["distillation"]
    log = [json.loads(x) for x in (tmp_path / "distill_log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "feat" and r["batch"] == 4 for r in log)
