"""The `tensorrt` backend on the CPU: ONNX export parity, the engine cache, and real TensorRT-RTX engine builds.

* ONNX parity: every exported component against the unmodified torch module, called the way FewStepPipeline calls
  it, under onnxruntime on the CPU. Tolerances: fp32 exports within rtol = atol = 1e-4 (observed ~1e-6); the fp16
  denoiser export within 2x torch's own fp16 error plus 1e-3 (both measured against fp32 torch).
* Stand-ins: onnxruntime sessions installed where the engines go; the whole pipeline must give the eager images.
* TensorRT: a real engine for the default-model format's denoiser, built by the TensorRT-RTX builder on this CPU
  (no mock); then a cache hit builds nothing, a weight byte changes the key, a flipped engine byte and a stale
  sidecar are detected and rebuilt. Skipped, with the reason, only where no TensorRT flavour can be imported.
The GPU runtime (TRTModule) is not exercised here: TensorRT-RTX needs a CUDA driver to deserialize.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fewstep.engines.backends import onnx_export as ox
from fewstep.engines.backends import tensorrt as T
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline

CPU = torch.device("cpu")


def _pipe(path, dtype=torch.float32):
    return FewStepPipeline(load_checkpoint(path, CPU, dtype), CPU, dtype)


# -- profiles ------------------------------------------------------------------------------------------------------
def test_profile_parse_and_shapes(tiny_dir):
    p = T.Profile.parse("batch=1:4:16,size=512:512:1024")
    assert p.batch == (1, 4, 16) and p.height == p.width == (512, 512, 1024)
    assert T.Profile.parse(str(p)) == p
    assert T.Profile.parse("batch=2,height=64:64:128,width=64").width == (64, 64, 64)
    for bad in ("batch=4:2:8", "size=1:2", "depth=1:1:1", "batch=a:b:c"):
        with pytest.raises(ValueError):
            T.Profile.parse(bad)

    pipe = _pipe(tiny_dir / "sd_turbo")  # tiny: VAE factor 2, two UNet levels -> sizes in multiples of 4 px
    _, unet = ox.wrap(pipe, "denoiser")
    shapes = T.Profile.parse("batch=1:2:4,size=32:64:128").shapes(unet)
    assert shapes["sample"] == ((1, 4, 16, 16), (2, 4, 32, 32), (8, 4, 64, 64))  # latents; CFG doubles max batch
    assert shapes["timestep"] == ((1,), (2,), (8,))
    assert shapes["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (8, 77, 32))
    with pytest.raises(ValueError, match="multiple of 4"):
        T.Profile.parse("size=10:12:16").shapes(unet)
    with pytest.raises(ValueError, match="at least 8"):
        T.Profile.parse("size=4:8:16").shapes(unet)


# -- engine cache (no TensorRT needed: bytes are bytes) -------------------------------------------------------------
FIELDS = {"component": "denoiser", "flavour": "tensorrt_rtx", "flavour_version": "1.7.1.116", "precision": "fp16"}


def test_out_of_profile_requests_are_refused_up_front(tiny_dir):
    """With engines of a fixed profile, a size outside it is a 400 at validation (no batch runs and fails), and a
    batching setting the engines cannot serve is refused at start-up. The runner says so through its own
    check_size and capabilities; the wrapped pipeline is left as it was."""
    from fewstep.engines.backends.tensorrt import Profile, TensorRTRunner
    from fewstep.engines.config import BatchingConfig, EngineConfig
    from fewstep.engines.core import EngineCore, EngineError, GenerateRequest
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.pipeline import FewStepPipeline
    from fewstep.engines.runner import Runner

    pipe = FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"))
    with pytest.raises(ValueError, match="batch max 4 < --max-batch-size 8"):
        TensorRTRunner(pipe, Profile.parse("batch=1:2:4,size=64:64:128"), 8)
    with pytest.raises(ValueError, match="must be 1"):
        TensorRTRunner(pipe, Profile.parse("batch=2:2:4,size=64"), 4)
    runner = TensorRTRunner(pipe, Profile.parse("batch=1:2:4,size=64:64:128"), 4)
    assert isinstance(runner, Runner)
    caps = runner.capabilities
    assert caps.backend == "tensorrt" and caps.max_images_per_batch == 4 and caps.kind == "image"
    assert "check_size" not in vars(pipe) and pipe.capabilities.max_images_per_batch is None  # nothing patched
    core = EngineCore({"m": runner}, EngineConfig(batching=BatchingConfig(max_batch_size=4)))
    with pytest.raises(EngineError) as e:
        core.validate(GenerateRequest(prompt="a cat", width=256, height=64))
    assert e.value.status == 400 and "outside this server's TensorRT engines" in str(e.value)
    with pytest.raises(EngineError, match="multiple of"):  # the model's own rule still applies first
        core.validate(GenerateRequest(prompt="a cat", width=99, height=64))
    core.validate(GenerateRequest(prompt="a cat", width=128, height=64, n=4))
    with pytest.raises(EngineError, match="n must be at most 4"):  # the engines' batch max, not 4 x 4
        core.validate(GenerateRequest(prompt="a cat", width=128, height=64, n=5))
    core.shutdown()


def test_engine_cache_round_trip_and_rejections(tmp_path):
    cache = T.EngineCache(tmp_path)
    key = T.engine_key(FIELDS)
    assert cache.load("denoiser", key, FIELDS) == (None, "not cached")
    blob = bytes(range(256)) * 64
    path = cache.store("denoiser", key, FIELDS, blob)
    assert cache.load("denoiser", key, FIELDS) == (blob, "")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"

    def reject(damage, why):
        cache.store("denoiser", key, FIELDS, blob)
        damage()
        data, reason = cache.load("denoiser", key, FIELDS)
        assert data is None and why in reason, reason
        assert not path.exists() and not path.with_suffix(".json").exists(), "a rejected entry must be deleted"

    def flip():
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))

    def stale():
        meta = json.loads(path.with_suffix(".json").read_text())
        meta["fields"]["flavour_version"] = "1.0.0"
        path.with_suffix(".json").write_text(json.dumps(meta))

    reject(flip, "checksum mismatch")
    reject(lambda: path.write_bytes(blob[:-1]), "checksum mismatch")
    reject(stale, "stale sidecar: flavour_version")
    reject(lambda: path.with_suffix(".json").write_text("{"), "sidecar unreadable")
    reject(lambda: path.with_suffix(".json").unlink(), "sidecar missing")
    reject(lambda: path.unlink(), "engine file missing")


def test_checkpoint_hash_follows_content(tiny_dir, tmp_path):
    model = shutil.copytree(tiny_dir / "pixel_dit", tmp_path / "m")
    h0 = T.checkpoint_content_hash(model, tmp_path / "memo")
    assert T.checkpoint_content_hash(model, tmp_path / "memo") == h0
    assert json.loads((tmp_path / "memo" / "checkpoint-hashes.json").read_text())[str(model.resolve())]["sha256"] == h0
    _flip_weight_byte(model)  # same size, new bytes
    assert T.checkpoint_content_hash(model, tmp_path / "memo") != h0


def _flip_weight_byte(model: Path) -> None:
    f = model / "transformer" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x01  # inside the last tensor's data, past the safetensors header
    f.write_bytes(bytes(raw))


# -- ONNX export parity --------------------------------------------------------------------------------------------
class OrtEngine:
    """An onnxruntime session with TRTModule's interface: ``inputs`` {name: dtype}, ``__call__(**x) -> dict``."""

    DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}

    def __init__(self, path: Path):
        ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the `test` extra")
        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: self.DTYPES[i.type] for i in self.sess.get_inputs()}
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def __call__(self, **feeds):
        outs = self.sess.run(None, {n: feeds[n].to(dt).contiguous().numpy() for n, dt in self.inputs.items()})
        return dict(zip(self.output_names, (torch.from_numpy(o) for o in outs)))


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """(model, component) -> ONNX path, exported once per test module (fp32)."""
    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript (`test` extra)")
    root = tmp_path_factory.mktemp("onnx")
    done: dict[tuple[str, str], Path] = {}

    def get(name: str, component: str) -> Path:
        if (name, component) not in done:
            path = root / name / f"{component}.onnx"
            spec = ox.export(_pipe(tiny_dir / name), component, path)
            assert [t.name for t in spec.inputs] == [i.name for i in OrtEngine(path).sess.get_inputs()]
            done[(name, component)] = path
        return done[(name, component)]

    return get


def _reference(pipe, component: str, x: dict[str, torch.Tensor]):
    """The torch module called exactly as FewStepPipeline calls it (no export wrapper involved)."""
    with torch.no_grad():
        if component == "text_encoder":
            return [pipe.text_encoder(x["input_ids"], attention_mask=x.get("attention_mask"))[0]]
        if component == "vae":
            return [pipe.vae.decode(x["latent"], return_dict=False)[0]]
        if pipe.denoiser_name == "unet":
            return [pipe.denoiser(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                                  return_dict=False)[0]]
        return [pipe.denoiser(x["hidden_states"], encoder_hidden_states=x["encoder_hidden_states"],
                              encoder_attention_mask=x["encoder_attention_mask"], timestep=x["timestep"],
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]]


def test_export_passes_fix_squeeze_and_mixed_cat(tmp_path):
    """The two graph fixes, on a toy: squeeze(1) of an axis that is never 1 (PixArt's unpatchify) and a cat of
    fp16 with fp32 (SDXL's micro-conditioning). Without them the ONNX graph fails or is invalid."""
    from torch.export import Dim

    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript (`test` extra)")

    class Toy(torch.nn.Module):
        def forward(self, x, t):  # x: [B, N, C] fp16, N >= 2; t: [B, 4] fp32
            return torch.cat([x.squeeze(1).mean(1), t], dim=-1) * 2

    x, t = torch.randn(2, 5, 3).half(), torch.randn(2, 4)
    ep = torch.export.export(Toy(), (x, t), dynamic_shapes=({0: Dim("b"), 1: Dim("n", min=2)}, {0: Dim("b")}))
    assert ox._drop_noop_squeezes(ep) == 1 and ox._promote_cat_inputs(ep) == 1
    torch.onnx.export(ep, (x, t), str(tmp_path / "toy.onnx"), dynamo=True, opset_version=ox.OPSET)
    engine = OrtEngine(tmp_path / "toy.onnx")
    x, t = torch.randn(3, 7, 3).half(), torch.randn(3, 4)
    (out,) = engine(x=x, t=t).values()
    torch.testing.assert_close(out, Toy()(x, t), rtol=1e-3, atol=1e-3)


# (model, component, [(batch, height, width) in the tensor's own units]); pixel_dit is the default-model format.
PARITY = [
    ("pixel_dit", "text_encoder", [(1, 2, 2), (3, 2, 2)]),
    ("pixel_dit", "denoiser", [(1, 16, 16), (3, 32, 16), (2, 8, 24)]),  # native size (stored table) and others
    ("sd_turbo", "text_encoder", [(1, 2, 2), (3, 2, 2)]),
    ("sd_turbo", "denoiser", [(1, 16, 16), (3, 8, 12)]),
    ("sd_turbo", "vae", [(1, 16, 16), (3, 6, 10)]),
]


@pytest.mark.parametrize("name,component,sizes", PARITY, ids=[f"{p[0]}-{p[1]}" for p in PARITY])
def test_onnx_matches_torch(tiny_dir, exported, name, component, sizes):
    pipe = _pipe(tiny_dir / name)
    engine = OrtEngine(exported(name, component))
    _, spec = ox.wrap(pipe, component)
    for i, (b, h, w) in enumerate(sizes):
        x = ox.example_inputs(spec, CPU, b, h, w, seed=i)
        got = [engine(**x)[t.name] for t in spec.outputs]
        for g, r in zip(got, _reference(pipe, component, x)):
            assert g.shape == r.shape
            assert r.abs().max() > 1e-3, "reference output is zero: the comparison would prove nothing"
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=lambda m: f"{(b, h, w)}: {m}")


def test_onnx_sdxl_text_encoder_outputs_pooled(tiny_dir, exported):
    pipe = _pipe(tiny_dir / "sdxl_turbo")
    engine = OrtEngine(exported("sdxl_turbo", "text_encoder_2"))
    ids = torch.randint(0, 100, (2, 77))
    out = pipe.text_encoder_2(ids, output_hidden_states=True)
    got = engine(input_ids=ids)
    torch.testing.assert_close(got["hidden_states"], out.hidden_states[-2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["pooled"], out[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,size,steps,guidance", [("pixel_dit", 16, 2, 0.0), ("pixel_dit", 32, 1, 0.0),
                                                       ("sd_turbo", 64, 2, 3.0)])
def test_standins_reproduce_eager_pipeline(tiny_dir, exported, name, size, steps, guidance):
    """Engines (here onnxruntime sessions) installed in the pipeline: encode_tokens, _model (with CFG's doubled
    batch for sd_turbo) and decode run unchanged and give the eager images."""
    eager = _pipe(tiny_dir / name)
    eager.nasa = None  # below guidance 1 the negative prompts would steer through NASA, which engines do not run
    args = (["a red circle", "two blue squares"], [7, 8], size, size, steps, guidance, ["blurry", ""])
    expected = eager(*args).numpy().astype(int)
    pipe = _pipe(tiny_dir / name)
    T.install(pipe, {c: OrtEngine(exported(name, c)) for c in ox.components(pipe)})
    assert type(pipe.text_encoder).__name__ == f"TRT{type(eager.text_encoder).__name__}"
    got = pipe(*args).numpy().astype(int)
    assert expected.std() > 5
    assert np.abs(got - expected).max() <= 1


# -- TensorRT: real engine builds on this CPU ----------------------------------------------------------------------
PROFILE = T.Profile.parse("batch=1:1:2,size=16:16:32")


def _builder_works() -> str:
    try:
        fl = T.import_tensorrt()
    except T.TensorRTUnavailable as e:
        return str(e)
    if not fl.rtx and not torch.cuda.is_available():
        return f"full TensorRT {fl.version} is installed and builds only on a GPU; TensorRT-RTX builds on the CPU"
    return ""


@pytest.fixture(scope="module")
def trt_env(tiny_dir, tmp_path_factory):
    reason = _builder_works()
    if reason:
        pytest.skip(f"no TensorRT builder here: {reason}")
    root = tmp_path_factory.mktemp("trt")
    return SimpleNamespace(model=shutil.copytree(tiny_dir / "pixel_dit", root / "pixel_dit"),
                           cache=root / "engines", onnx=root / "onnx", root=root)


def _build(env, model=None, **kw) -> T.BuildResult:
    (r,) = T.build(model or env.model, PROFILE, "fp16", components=["denoiser"], cache_dir=env.cache, **kw)
    return r


@pytest.fixture(scope="module")
def built(trt_env):
    before = T.BUILDS["fewstep/denoiser"]
    r = _build(trt_env, onnx_dir=trt_env.onnx)
    assert not r.hit and r.reason == "not cached"
    assert T.BUILDS["fewstep/denoiser"] == before + 1
    return r


def test_builds_real_denoiser_engine(built):
    fl = T.import_tensorrt()
    data = built.path.read_bytes()
    meta = json.loads(built.path.with_suffix(".json").read_text())
    assert len(data) == built.size == meta["size"] > 100_000
    # Deserializing needs a CUDA driver even for TensorRT-RTX; without one, check what the plan and sidecar say.
    assert b"fewstep/denoiser" in data, "network name missing from the plan"
    assert all(n.encode() in data for n in ("hidden_states", "encoder_hidden_states", "encoder_attention_mask",
                                             "timestep", "out"))
    assert meta["fields"] == built.fields and meta["key"] == built.key == T.engine_key(built.fields)
    f = built.fields
    assert (f["flavour"], f["flavour_version"], f["precision"], f["component"]) == (fl.name, fl.version, "fp16",
                                                                                      "denoiser")
    if fl.rtx and not torch.cuda.is_available():
        assert f["target"] == "rtx-default"  # the CPU-only build targets RTX's default compute capabilities
    io = {t["name"]: t for t in meta["io"]}
    assert io["hidden_states"]["dtype"] == "HALF" and io["out"]["dtype"] == "HALF"
    assert io["encoder_attention_mask"]["dtype"] == "INT64" and io["timestep"]["dtype"] == "FLOAT"
    assert io["hidden_states"]["min"] == [1, 3, 16, 16] and io["hidden_states"]["max"] == [4, 3, 32, 32]
    assert io["hidden_states"]["dims"] == [-1, 3, -1, -1]


def test_fp16_onnx_within_torch_fp16_error(tiny_dir, built, trt_env):
    """The graph the engine was built from, in fp16, against fp32 torch: no worse than torch's own fp16."""
    p32, p16 = _pipe(tiny_dir / "pixel_dit"), _pipe(tiny_dir / "pixel_dit", torch.float16)
    engine = OrtEngine(trt_env.onnx / "denoiser.onnx")
    _, spec = ox.wrap(p16, "denoiser")
    x16 = ox.example_inputs(spec, CPU, 3, 32, 16)
    x32 = {k: v.float() if v.is_floating_point() else v for k, v in x16.items()}
    ref = _reference(p32, "denoiser", x32)[0]
    err_torch = (_reference(p16, "denoiser", x16)[0].float() - ref).abs().max().item()
    err_onnx = (engine(**x16)["out"].float() - ref).abs().max().item()
    assert err_onnx <= 2 * err_torch + 1e-3, (err_onnx, err_torch)


def test_second_build_is_a_cache_hit(built, trt_env):
    before = T.BUILDS["fewstep/denoiser"]
    r = _build(trt_env)
    assert r.hit and r.key == built.key and r.path == built.path
    assert T.BUILDS["fewstep/denoiser"] == before, "a cache hit must not call the builder"


def test_cli_build_reports_cache_hit(built, trt_env, capsys):
    from fewstep.server.cli import main

    assert main(["build", "--model", str(trt_env.model), "--engine", "tensorrt", "--profile", str(PROFILE),
                 "--precision", "fp16", "--cache-dir", str(trt_env.cache), "--components", "denoiser"]) == 0
    out = capsys.readouterr().out
    assert "denoiser: cache hit" in out and str(built.path) in out and "0 built" in out


def test_changed_weight_invalidates(built, trt_env):
    copy = shutil.copytree(trt_env.model, trt_env.root / "pixel_dit_copy")
    before = T.BUILDS["fewstep/denoiser"]
    same = _build(trt_env, copy)
    assert same.hit and same.key == built.key, "the key is the content, not the path"
    _flip_weight_byte(copy)
    r = _build(trt_env, copy)
    assert not r.hit and r.key != built.key and r.reason == "not cached"
    assert r.fields["checkpoint_sha256"] != built.fields["checkpoint_sha256"]
    assert T.BUILDS["fewstep/denoiser"] == before + 1
    assert built.path.exists(), "the other checkpoint's engine stays cached"


def test_corrupted_engine_is_detected_and_rebuilt(built, trt_env):
    raw = bytearray(built.path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    built.path.write_bytes(bytes(raw))
    before = T.BUILDS["fewstep/denoiser"]
    r = _build(trt_env)
    assert not r.hit and "checksum mismatch" in r.reason and r.key == built.key
    assert T.BUILDS["fewstep/denoiser"] == before + 1
    assert T.EngineCache(trt_env.cache).load("denoiser", r.key, r.fields)[0] is not None, "rebuilt entry verifies"


def test_stale_sidecar_is_rebuilt(built, trt_env):
    sidecar = built.path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["fields"]["flavour_version"] = "0.0.1"
    sidecar.write_text(json.dumps(meta))
    before = T.BUILDS["fewstep/denoiser"]
    r = _build(trt_env)
    assert not r.hit and "stale sidecar: flavour_version" in r.reason
    assert T.BUILDS["fewstep/denoiser"] == before + 1
    assert json.loads(sidecar.read_text())["fields"]["flavour_version"] == T.import_tensorrt().version


# -- without the extra ---------------------------------------------------------------------------------------------
# sys.modules[name] = None makes `import name` raise ImportError: the extra looks uninstalled, nothing is removed.
def _cli_build(model, cache, capsys) -> tuple[int, str]:
    from fewstep.server.cli import main

    rc = main(["build", "--model", str(model), "--profile", str(PROFILE), "--cache-dir", str(cache),
               "--components", "denoiser"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("module", ["onnxscript", "onnx"])
def test_build_without_the_exporter_names_the_extra(tiny_dir, tmp_path, monkeypatch, capsys, module):
    monkeypatch.setitem(__import__("sys").modules, module, None)
    rc, err = _cli_build(tiny_dir / "pixel_dit", tmp_path / "engines", capsys)
    assert rc == 2, err
    assert 'pip install "fewstep[tensorrt]"' in err and module in err
    assert "ModuleNotFoundError" not in err and "Traceback" not in err


def test_build_without_tensorrt_names_the_extra(tiny_dir, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(T, "_FLAVOURS", {})  # forget a flavour imported by an earlier test
    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.setitem(sys.modules, name, None)
    rc, err = _cli_build(tiny_dir / "pixel_dit", tmp_path / "engines", capsys)
    assert rc == 2, err
    assert 'pip install "fewstep[tensorrt]"' in err and "Traceback" not in err
