"""TDPM's amortized generator (generator.py), the `tdpm` generation method and its CLI errors: tiny networks,
16 px sprites, a few steps on the CPU. Quality targets live in benchmarks/, not here."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from by_hand import SCHED, abar, ddpm_chain_by_hand, draw, gens
from cli_helpers import run as run_cli
from diffusers import UNet2DModel
from jobs import generate
from safetensors.torch import load_file, save_file
from stubs import StubG, StubUNet, eps_linear, tiny_unet

from tdpm_dip.errors import UserError
from tdpm_dip.generator import TDPMGenerator, draw_latents, load_generator, style_dim
from tdpm_dip.methods import Context, Job, run
from tdpm_dip.models import build_unet, load_ddpm, save_ddpm
from tdpm_dip.noise import image_generators, make_scheduler
from tdpm_dip.sampling import EpsModel
from tdpm_dip.training.generator import Discriminator, make_pairs, minibatch_stddev, train_generator
from tdpm_dip.training.options import GeneratorConfig

SIZE = 16


@pytest.fixture(scope="module")
def ddpm16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddpm16")
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("linear"), out)
    return out


def _cfg(model: Path, data: Path | None, out: Path, objective: str, **kw) -> GeneratorConfig:
    base = dict(
        model=str(model),
        data=str(data) if data else None,
        t_trunc=3,
        out=str(out),
        objective=objective,
        steps=4,
        batch_size=4,
        pairs=8,
        ddim_steps=3,
        checkpoint_every=2,
        sample_every=0,
        n_samples=2,
        log_every=1,
    )
    return GeneratorConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def gan_run(ddpm16: Path, sprite_dir_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gan") / "run"
    return train_generator(_cfg(ddpm16, sprite_dir_factory(8, SIZE), out, "gan"), progress=False)


@pytest.mark.parametrize("objective", ["gan", "distill"])
def test_a_few_steps_export_a_diffusers_generator(
    objective: str, ddpm16: Path, sprite_dir_factory, tmp_path: Path, gan_run: Path
) -> None:
    export = (
        gan_run
        if objective == "gan"
        else train_generator(_cfg(ddpm16, sprite_dir_factory(8, SIZE), tmp_path / "run", objective), progress=False)
    )
    meta = json.loads((export / "generator.json").read_text())
    assert meta["t_trunc"] == 3 and meta["z_shape"] == [3, SIZE, SIZE] and meta["objective"] == objective
    assert meta["image_size"] == SIZE and meta["ddpm"] == ddpm16.name and meta["w_dim"] == 64
    unet = UNet2DModel.from_pretrained(export, use_safetensors=True)  # what diffusers loads
    assert (export / "diffusion_pytorch_model.safetensors").is_file() and style_dim(unet.config) == 64
    z = torch.randn(2, 3, SIZE, SIZE)
    out = unet(z, 0, class_labels=torch.randn(2, 64)).sample
    assert out.shape == (2, 3, SIZE, SIZE) and torch.isfinite(out).all()
    # The style vector is an input that matters: same z_img, another w, another image.
    assert (unet(z, 0, class_labels=torch.randn(2, 64)).sample - out).abs().max() > 1e-4
    lines = [json.loads(x) for x in (export.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    if objective == "gan":
        assert all("loss_d" in r and "r1" in r for r in lines)
        ckpt = sorted((export.parent / "checkpoints").iterdir())[-1]
        assert (ckpt / "discriminator.safetensors").is_file()
        assert any(k.startswith("disc_optimizer.") for k in load_file(ckpt / "training_state.safetensors"))
    else:
        pairs = load_file(export.parent / "pairs.safetensors")
        assert pairs["z"].shape == (8, 3, SIZE, SIZE) and pairs["w"].shape == (8, 64)


def test_resume_equals_an_uninterrupted_run(ddpm16: Path, sprite_dir_factory, tmp_path: Path, gan_run: Path) -> None:
    data = sprite_dir_factory(8, SIZE)
    out = tmp_path / "cut"
    train_generator(_cfg(ddpm16, data, out, "gan", steps=2), progress=False)
    with pytest.raises(UserError, match="different options"):
        train_generator(_cfg(ddpm16, data, out, "gan", steps=4, resume=True, r1_gamma=1.0), progress=False)
    resumed = train_generator(_cfg(ddpm16, data, out, "gan", steps=4, resume=True), progress=False)
    a = load_file(resumed / "diffusion_pytorch_model.safetensors")
    b = load_file(gan_run / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    da = load_file(out / "checkpoints" / "step_000004" / "discriminator.safetensors")
    db = load_file(gan_run.parent / "checkpoints" / "step_000004" / "discriminator.safetensors")
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_distill_pairs_are_seeded_ddim_to_t_trunc(ddpm16: Path) -> None:
    unet, sched = load_ddpm(ddpm16)
    z1, x1, w1 = make_pairs(unet, sched, 3, 5, 4, seed=0, device=torch.device("cpu"), batch_size=2, w_dim=6)
    z2, x2, w2 = make_pairs(unet, sched, 3, 5, 4, seed=0, device=torch.device("cpu"), batch_size=3, w_dim=6)
    # Pair j depends on (seed, j) only; batching changes x only by float rounding, amplified by 1/sqrt(abar_T).
    assert torch.equal(z1, z2) and torch.equal(w1, w2) and (x1 - x2).abs().max() < 1e-2
    assert not torch.allclose(x1, z1) and w1.shape == (3, 6)
    z3, x3, w3 = make_pairs(unet, sched, 3, 5, 4, seed=0, device=torch.device("cpu"), batch_size=3)
    assert w3 is None and torch.equal(z3, z1)  # w is drawn after z_img: the same z_img without it


def test_minibatch_stddev_sees_a_batch_without_variety() -> None:
    torch.manual_seed(0)
    varied = torch.randn(6, 5, 4, 4)
    same = varied[:1].expand(6, -1, -1, -1)
    for h in (varied, same):
        out = minibatch_stddev(h)
        assert out.shape == (6, 6, 4, 4) and torch.equal(out[:, :5], h)
    assert minibatch_stddev(same)[:, 5].abs().max() < 1e-3 < minibatch_stddev(varied)[:, 5].min()
    # Groups of 3 (the largest size <= 4 dividing 6): images 0, 2, 4 are one group, so their channel agrees.
    s = minibatch_stddev(varied)[:, 5, 0, 0]
    assert s[0] == s[2] == s[4] and s[0] != s[1]
    for b in (1, 5, 8):  # any batch size runs (a prime one falls back to groups of 1 or itself)
        assert Discriminator(16, 4)(torch.randn(b, 3, 16, 16)).shape == (b,)


class _Counting(torch.nn.Module):
    """Wraps a UNet and counts its forward calls (one per batch of images)."""

    def __init__(self, net: UNet2DModel) -> None:
        super().__init__()
        self.net, self.calls = net, 0
        self.dtype, self.config = net.dtype, net.config

    def forward(self, *a, **k):
        self.calls += 1
        return self.net(*a, **k)


def test_tdpm_sampler_makes_1_plus_t_trunc_network_calls(
    ddpm16: Path, gan_run: Path, make_ctx: Callable[..., Context]
) -> None:
    unet, sched = load_ddpm(ddpm16)
    gen = load_generator(gan_run, unet, sched)
    counted_ddpm, counted_gen = _Counting(unet), _Counting(gen.unet)
    ctx = make_ctx(
        counted_ddpm,
        sched,
        batch_size=8,
        generator=type(gen)(counted_gen, gen.t_trunc, gen.z_shape, gen.info, gen.path),
    )
    res = generate(ctx, "tdpm", [0, 1, 2])
    assert res.nfe == 1 + 3 and res.info["t_trunc"] == 3
    assert (counted_gen.calls, counted_ddpm.calls) == (1, 3)  # one batch: 1 generator call, T_trunc chain steps
    assert res.images.shape == (3, 3, SIZE, SIZE) and res.images.abs().max() <= 1
    again = generate(make_ctx(unet, sched, batch_size=1, generator=gen), "tdpm", [1])
    assert torch.allclose(again.images[0], res.images[1], atol=1e-5)  # image i depends on seed i only


def test_reverse_steps_stride_the_chain_from_t_trunc(
    ddpm16: Path, sprite_dir_factory, tmp_path: Path, gan_run: Path, make_ctx: Callable[..., Context]
) -> None:
    """A generator trained with --reverse-steps k records it; sampling then costs 1 + k calls, the DDPM at the
    levels round(linspace(T_trunc, 0, k + 1)) only."""
    export = train_generator(
        _cfg(ddpm16, sprite_dir_factory(8, SIZE), tmp_path / "run", "gan", t_trunc=12, reverse_steps=3, steps=1),
        progress=False,
    )
    assert json.loads((export / "generator.json").read_text())["reverse_steps"] == 3
    assert json.loads((gan_run / "generator.json").read_text())["reverse_steps"] == 3  # default: T_trunc (3)
    unet, sched = load_ddpm(ddpm16)
    gen = load_generator(export, unet, sched)
    seen: list[int] = []

    class Recording(torch.nn.Module):
        dtype, config = unet.dtype, unet.config

        def forward(self, x, t, **k):
            seen.append(int(t))
            return unet(x, t, **k)

    res = generate(make_ctx(Recording(), sched, batch_size=8, generator=gen), "tdpm", [0, 1])
    assert res.nfe == 1 + 3 and res.info["reverse_steps"] == 3 and res.info["t_trunc"] == 12
    assert seen == [11, 7, 3]  # levels 12, 8, 4 at diffusers timesteps level - 1
    with pytest.raises(UserError, match="reverse-steps must be in 1..T_trunc"):
        _cfg(ddpm16, None, tmp_path / "o", "distill", t_trunc=3, reverse_steps=4)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in export.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    meta = json.loads((bad / "generator.json").read_text())
    (bad / "generator.json").write_text(json.dumps({**meta, "reverse_steps": 13}))
    with pytest.raises(UserError, match="reverse_steps must be in 1..T_trunc"):
        load_generator(bad, unet, sched)


def test_generate_tdpm_cli_and_its_one_line_errors(
    ddpm16: Path, gan_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["generate", "--model", ddpm16, "--method", "tdpm", "--n", "2", "--device", "cpu"]
    code, _, _ = run_cli(base + ["--generator", gan_run, "--dtype", "fp32", "--out", tmp_path / "ok"], capsys)
    res = json.loads((tmp_path / "ok" / "result.json").read_text())
    assert code == 0 and res["method"] == "tdpm" and res["nfe"] == 4 and (tmp_path / "ok" / "grid.png").is_file()
    assert res["run"]["dtype"] == "torch.float32"  # no autocast, recorded as such (not "None")

    other = tmp_path / "ddpm32"
    save_ddpm(build_unet("tiny", seed=0, sample_size=32), make_scheduler("linear"), other)
    cosine = tmp_path / "cosine16"
    save_ddpm(build_unet("tiny", seed=0, sample_size=SIZE), make_scheduler("cosine"), cosine)
    retrained = tmp_path / "retrained16"  # the same size and schedule, other weights
    save_ddpm(build_unet("tiny", seed=1, sample_size=SIZE), make_scheduler("linear"), retrained)
    distilled = train_generator(_cfg(ddpm16, None, tmp_path / "distill", "distill"), progress=False)
    bad_json = tmp_path / "badgen"
    bad_json.mkdir()
    (bad_json / "generator.json").write_text("{not json")
    cases = [
        (base + ["--out", tmp_path / "e1"], "needs --generator"),
        (base + ["--generator", ddpm16, "--out", tmp_path / "e2"], "not a generator folder"),
        (base + ["--generator", tmp_path / "nowhere", "--out", tmp_path / "e3"], "no such folder"),
        (base + ["--generator", bad_json, "--out", tmp_path / "e4"], "unreadable generator.json"),
        (
            ["generate", "--model", other, "--method", "tdpm", "--generator", gan_run, "--out", tmp_path / "e5"],
            "makes 16 px images, but the DDPM makes 32 px",
        ),
        (base + ["--generator", gan_run, "--t-trunc", "5", "--out", tmp_path / "e6"], "does not match"),
        (
            ["generate", "--model", cosine, "--method", "tdpm", "--generator", gan_run, "--out", tmp_path / "e8"],
            "trained for the linear noise schedule, but the DDPM's is squaredcos_cap_v2",
        ),
        (
            ["generate", "--model", retrained, "--method", "tdpm", "--generator", distilled, "--out", tmp_path / "e9"],
            "was distilled from another DDPM",
        ),
        (
            ["generate", "--model", ddpm16, "--method", "ddim", "--generator", gan_run, "--out", tmp_path / "e7"],
            "--generator is for --method tdpm",
        ),
    ]
    for args, msg in cases:
        code, out, err = run_cli(args, capsys)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (args, err)
        assert not Path(args[-1]).exists()  # nothing half-written
    # a GAN generator may serve another DDPM of its size and schedule (its target does not involve the DDPM)
    code, _, err = run_cli(
        [
            "generate",
            "--model",
            retrained,
            "--method",
            "tdpm",
            "--generator",
            gan_run,
            "--n",
            "1",
            "--out",
            tmp_path / "gan-other",
        ],
        capsys,
    )
    assert code == 0, err


def test_config_errors(tmp_path: Path) -> None:
    for objective, bad in (
        ("vae", {}),
        ("gan", dict(t_trunc=-1)),
        ("gan", dict(preset="nope")),
        ("gan", dict(r1_gamma=-1.0)),
        ("gan", dict(mixed_precision="fp16")),
        ("distill", dict(steps=0)),
    ):
        with pytest.raises(UserError):
            _cfg(tmp_path, tmp_path, tmp_path / "o", objective, **bad)
    with pytest.raises(UserError, match="needs --data"):
        _cfg(tmp_path, None, tmp_path / "o", "gan")
    _cfg(tmp_path, None, tmp_path / "o", "distill")  # distill needs no images


def test_init_starts_from_another_generator(ddpm16: Path, sprite_dir_factory, tmp_path: Path, gan_run: Path) -> None:
    data = sprite_dir_factory(8, SIZE)
    # One step at a negligible learning rate: the export equals the --init weights, now for T_trunc 5.
    export = train_generator(
        _cfg(ddpm16, data, tmp_path / "ft", "gan", t_trunc=5, steps=1, lr=1e-12, init=str(gan_run)), progress=False
    )
    a = load_file(export / "diffusion_pytorch_model.safetensors")
    b = load_file(gan_run / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    meta = json.loads((export / "generator.json").read_text())
    assert meta["t_trunc"] == 5 and meta["init"] == str(gan_run)
    fresh = train_generator(_cfg(ddpm16, data, tmp_path / "fresh", "gan", steps=1, lr=1e-12), progress=False)
    c = load_file(fresh / "diffusion_pytorch_model.safetensors")
    assert any(not torch.allclose(a[k], c[k], atol=1e-3) for k in a)  # without --init: another start
    with pytest.raises(UserError, match=r"^--init .*: not a generator folder"):  # the option the user gave
        train_generator(_cfg(ddpm16, data, tmp_path / "bad", "gan", init=str(ddpm16)), progress=False)
    with pytest.raises(UserError, match=r"^--init .*: not a folder \(a generator is the folder of generator.json\)"):
        train_generator(_cfg(ddpm16, data, tmp_path / "bad", "gan", init=str(gan_run / "generator.json")))
    assert not (tmp_path / "bad").exists()
    # A GAN generator may start another DDPM's GAN (its target does not involve the DDPM), not a distillation.
    other = tmp_path / "other-ddpm"
    save_ddpm(build_unet("tiny", seed=1, sample_size=SIZE), make_scheduler("linear"), other)
    moved = train_generator(_cfg(other, data, tmp_path / "moved", "gan", steps=1, init=str(gan_run)), progress=False)
    assert json.loads((moved / "generator.json").read_text())["ddpm_fingerprint"] != meta["ddpm_fingerprint"]
    with pytest.raises(UserError, match="belongs to another DDPM"):
        train_generator(_cfg(other, data, tmp_path / "d", "distill", steps=1, init=str(export)), progress=False)


def test_export_generator_writes_an_fp16_copy_without_local_paths(ddpm16: Path, gan_run: Path, tmp_path: Path) -> None:
    from tdpm_dip.embedded import export_generator

    dest = export_generator(gan_run, tmp_path / "shipped")
    header = load_file(dest / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in header.values()} == {torch.float16}
    meta, src_meta = (json.loads((d / "generator.json").read_text()) for d in (dest, gan_run))
    assert meta["data"] == Path(src_meta["data"]).name and "/" not in meta["data"]
    assert {k: v for k, v in meta.items() if k != "data"} == {k: v for k, v in src_meta.items() if k != "data"}
    assert json.loads((dest / "config.json").read_text())["_name_or_path"] == "shipped"  # not this machine's path
    unet, sched = load_ddpm(ddpm16)
    a, b = load_generator(gan_run, unet, sched), load_generator(dest, unet, sched)
    z, w = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, a.w_dim)
    assert (a(z, w) - b(z, w)).abs().max() < 1e-2  # fp16 weights, same network
    tensors = load_file(dest / "diffusion_pytorch_model.safetensors")
    tensors.pop("conv_out.bias")
    save_file(tensors, dest / "diffusion_pytorch_model.safetensors")  # a file without one of G_psi's tensors
    with pytest.raises(UserError, match=r"^--generator .*shipped: cannot load the generator weights \(the file lacks"):
        load_generator(dest, unet, sched)


def test_export_pairs_a_gan_generator_with_another_ddpm(
    ddpm16: Path, gan_run: Path, sprite_dir_factory, tmp_path: Path
) -> None:
    """export_generator --ddpm: a GAN generator is recorded as the given DDPM's (the one it was trained beside
    kept), with the reverse steps asked for; a distilled one refuses another DDPM; bad steps are refused."""
    from tdpm_dip.embedded import export_generator
    from tdpm_dip.models import ddpm_fingerprint

    other = tmp_path / "other-ddpm"
    save_ddpm(build_unet("tiny", seed=3, sample_size=SIZE), make_scheduler("linear"), other)
    dest = export_generator(gan_run, tmp_path / "paired", ddpm=other, reverse_steps=2)
    meta, src_meta = (json.loads((d / "generator.json").read_text()) for d in (dest, gan_run))
    unet, sched = load_ddpm(other)
    assert meta["ddpm"] == "other-ddpm" and meta["ddpm_fingerprint"] == ddpm_fingerprint(unet, sched)
    assert meta["trained_with_fingerprint"] == src_meta["ddpm_fingerprint"] != meta["ddpm_fingerprint"]
    assert load_generator(dest, unet, sched).reverse_steps == 2
    with pytest.raises(UserError, match="reverse-steps must be in 1..T_trunc"):
        export_generator(gan_run, tmp_path / "bad", reverse_steps=4)
    distilled = train_generator(
        _cfg(ddpm16, sprite_dir_factory(8, SIZE), tmp_path / "dist", "distill", steps=1), progress=False
    )
    with pytest.raises(UserError, match="was distilled from another DDPM"):
        export_generator(distilled, tmp_path / "d2", ddpm=other)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "d2").exists()


# ------------------------------------------------------------------------------------------ the sampler by hand


def tdpm_by_hand(
    unet: StubUNet, seeds: list[int], t: int, z_shape: tuple[int, ...], w_dim: int, predict_x0: bool
) -> torch.Tensor:
    """Amortized TDPM of each image from its own generator: z_img, then w, then (predict x0) eps; x_T = G(z, w) or
    sqrt(abar_t) G(z, w) + sqrt(1 - abar_t) eps; then t DDPM posterior steps on the same generator; clamped."""
    out = []
    for s in seeds:
        g = gens([s])
        z = draw(z_shape, g)
        x = 0.5 * z
        if w_dim:
            x = x + draw((w_dim,), g).mean(1).view(-1, 1, 1, 1)
        if predict_x0:
            x = math.sqrt(abar(t)) * x + math.sqrt(1 - abar(t)) * draw(z_shape, g)
        out.append(ddpm_chain_by_hand(unet, x, t, g).clamp(-1, 1))
    return torch.cat(out)


@pytest.mark.parametrize("w_dim, predict", [(0, "x_T"), (4, "x_T"), (4, "x0")])
def test_tdpm_generator_samples_by_hand(w_dim: int, predict: str, make_ctx: Callable[..., Context]) -> None:
    """TDPMGenerator.sample: G_psi at timestep 0 on (z_img, w) drawn from image i's generator, the forward noise of
    level T_trunc added when it predicts x0, then T_trunc DDPM steps; the same through `generate --method tdpm`, in
    batches, with its cost and info."""
    z_shape, t, seeds = (3, 8, 8), 5, [3, 4, 5]
    net = StubG(w_dim)
    gen = TDPMGenerator(net, t, z_shape, {"predict": predict, "objective": "mse"}, "gen-folder")  # type: ignore[arg-type]
    unet = eps_linear()
    expected = tdpm_by_hand(eps_linear(), seeds, t, z_shape, w_dim, predict == "x0")
    seen: list[int] = []
    got = gen.sample(EpsModel(unet, SCHED), image_generators(seeds), seen.append)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert seen == [4, 3, 2, 1, 0] and unet.timesteps == [4, 3, 2, 1, 0]
    assert [ts for ts, _ in net.calls] == [0] and (net.calls[0][1] is None) == (w_dim == 0)
    z, w = draw_latents(z_shape, w_dim, image_generators(seeds), "cpu")
    g = gens(seeds)
    assert torch.equal(z, draw(z_shape, g)) and (w is None if not w_dim else torch.equal(w, draw((w_dim,), g)))

    res = run(
        make_ctx(eps_linear(), batch_size=2, generator=gen),
        "generate",
        "unconditional",
        "tdpm",
        Job(tuple(seeds)),
    )
    assert torch.allclose(res.images, expected, rtol=0, atol=1e-6)
    assert (res.method, res.protocol, res.reverse_steps, res.nfe) == ("tdpm", "unconditional", 1 + t, 1 + t)
    assert res.info == {"t_trunc": t, "reverse_steps": t, "generator": "gen-folder", "objective": "mse"}
    assert isinstance(res.seconds, float) and res.seconds >= 0  # its time is measured (the bench's s/img)


def test_tdpm_method_refuses_a_missing_or_mismatched_generator(make_ctx: Callable[..., Context]) -> None:
    """`tdpm` needs a generator, made for the job's T_trunc; the messages are what the CLI prints."""
    with pytest.raises(UserError) as e:
        run(make_ctx(), "generate", "unconditional", "tdpm", Job((0,)))
    assert str(e.value) == "method tdpm needs a generator (--generator, made by `tdpm-dip train-generator`)"
    gen = TDPMGenerator(StubG(), 5, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    with pytest.raises(UserError) as e:
        run(make_ctx(generator=gen), "generate", "unconditional", "tdpm", Job((0,), t_trunc=3))
    assert str(e.value) == "T_trunc 3 does not match the generator's 5 (g)"
    res = run(make_ctx(generator=gen), "generate", "unconditional", "tdpm", Job((0,), t_trunc=5))
    assert res.info["t_trunc"] == 5 and res.info["objective"] is None
    bad = TDPMGenerator(StubG(), 1000, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="T_trunc must be an integer in"):
        run(make_ctx(generator=bad), "generate", "unconditional", "tdpm", Job((0,)))


def test_amortized_sampler_clamps_a_chain_of_no_steps_and_casts_to_the_networks_dtype() -> None:
    """T_trunc = 0: the sample is G(z) itself, clamped to [-1, 1] (with steps, the last DDPM step already returns a
    clipped x0). A generator network in bf16 gets its latents in bf16 and returns float32."""
    net = StubG()
    gen = TDPMGenerator(net, 0, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    g = gens([1, 2])
    z = draw((3, 8, 8), g)
    big = TDPMGenerator(StubG(), 0, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    big.unet.forward = lambda z, t, class_labels=None: SimpleNamespace(sample=6 * z)  # type: ignore[method-assign]
    out = big.sample(EpsModel(tiny_unet(), SCHED), image_generators([1, 2]))
    assert torch.equal(out, (6 * z).clamp(-1, 1)) and (6 * z).abs().max() > 2
    assert torch.equal(gen.sample(EpsModel(tiny_unet(), SCHED), image_generators([1, 2])), (0.5 * z).clamp(-1, 1))
    unet = build_unet("generator-small", seed=0, sample_size=8).to(torch.bfloat16).eval()
    bf = TDPMGenerator(unet, 0, (3, 8, 8), {}, "g")  # type: ignore[arg-type]
    assert bf.w_dim > 0
    x = bf.x_t(EpsModel(tiny_unet(), SCHED), image_generators([1, 2]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
