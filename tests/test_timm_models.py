"""timm backbones through lit_robust: the defense contract on tiny timm models (a ResNet, a ViT, a ConvNeXt),
evaluation tiers, certificates, the normalisation inside, local checkpoints and the 32x32 stems."""

import math

import pytest
import torch

from digits_bench import InferenceModeSeen, data_per_defense, quiet_trainer

from lit_robust.datamodules import DigitsDataModule
from lit_robust.defenses import CERTIFIED_DEFENSES, DEFENSES

timm = pytest.importorskip("timm")

from lit_robust.models import DIGITS_MEAN, DIGITS_STD, TimmClassifier  # noqa: E402
from lit_robust.models.timm_models import load_pretrained  # noqa: E402

EPS = 0.2
CONVNET, VIT, CONVNEXT = "test_resnet", "test_vit", "test_convnext"
#: every defense on the BatchNorm ResNet; a few with different inner loops on all three architectures
SUBSET = ("PGDAT", "TRADES", "FastAT", "FreeAT", "GradAlign")
CASES = [(name, CONVNET) for name in DEFENSES] + [(n, a) for a in (VIT, CONVNEXT) for n in SUBSET]
BOUND_BASED = ("CertifiedTraining", "GaussianLossSmoothing", "SABR", "MTLIBP")
SMOOTHING = ("GaussianAugmentation", "SmoothMix")
DOUBLE_BACKWARD = ("GradAlign", "JacobianPGDAT", "JacobianTRADES")  #: differentiate input gradients


class UpsampledDigits(DigitsDataModule):
    """The 8x8 digits, nearest-neighbour upsampled 4x to 32x32 (values stay 0..16), 1 or 3 channels."""

    def __init__(self, channels: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.channels = channels
        self.dims = (channels, 32, 32)

    def split_arrays(self):
        def grow(images):
            return images.repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, self.channels, -1, -1).contiguous()

        return {name: (grow(x), y) for name, (x, y) in super().split_arrays().items()}


def net(arch: str = CONVNET, **kwargs) -> TimmClassifier:
    return TimmClassifier(arch, num_classes=10, **kwargs)


def make(name: str, arch: str):
    if name in DEFENSES:
        kwargs = dict(eps=EPS, steps=2, step_size=0.1, val_attack_steps=1, test_attack_steps=1)
        if name == "RLAT":  # no default layers for foreign models: the stem and the end of two stages
            kwargs["layers"] = ["model.conv1", "model.layer2", "model.layer4"]
        return DEFENSES[name](net(arch, fused_attn=name not in DOUBLE_BACKWARD), **kwargs)
    extra = {"num_noise_vec": 2, "steps": 2, "step_size": 0.5} if name == "SmoothMix" else {}
    return CERTIFIED_DEFENSES[name](net(arch), sigma=0.25, eps=0.25, test_n0=4, test_n=16, **extra)


@pytest.fixture(scope="module")
def data():
    return data_per_defense(lambda flag: UpsampledDigits(batch_size=8, eval_batch_size=16, with_index=flag,
                                                         test_size=16))


@pytest.mark.parametrize("name,arch", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_defense_trains_validates_and_tests(tmp_path, data, name, arch):
    """Two training and validation steps, then test batches under inference mode, accuracies in [0, 1]."""
    module, seen = make(name, arch), InferenceModeSeen()
    trainer = quiet_trainer(tmp_path, fast_dev_run=2, callbacks=[seen])
    trainer.fit(module, data(name))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    seen.flags.clear()
    test = trainer.test(module, data(name), verbose=False)[0]
    assert seen.flags and all(seen.flags)
    assert {"test/clean_acc", "test/robust_acc"} <= set(test) and all(0 <= v <= 1 for v in test.values())


@pytest.mark.parametrize("arch", [CONVNET, VIT])
def test_training_attack_stays_in_threat_model_and_leaves_no_gradients(data, arch):
    module = make("PGDAT", arch)
    x, y = next(iter(data("PGDAT").train_dataloader()))
    module.train()
    x_adv = module.perturb(x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    assert all(p.grad is None for p in module.parameters())
    assert all(m.training for m in module.modules())


def test_rlat_without_layers_refuses_a_timm_model():
    with pytest.raises(ValueError, match="layers"):
        DEFENSES["RLAT"](net(), eps=EPS)


@pytest.mark.parametrize("name", SMOOTHING)
def test_randomized_smoothing_defenses_train_and_certify(tmp_path, data, name):
    module = make(name, VIT)
    trainer = quiet_trainer(tmp_path, fast_dev_run=2)
    trainer.fit(module, data(name))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    test = trainer.test(module, data(name), verbose=False)[0]
    assert 0 <= test["test/clean_acc"] <= 1 and any(k.startswith("test/certified") for k in test), test


@pytest.mark.parametrize("name", BOUND_BASED)
@pytest.mark.parametrize("arch,layer", [(CONVNET, "ResNet"), (VIT, "VisionTransformer")])
def test_bound_propagation_names_the_unsupported_layer(name, arch, layer):
    """IBP / CROWN-IBP handle Conv/Linear/BN/ReLU Sequentials only: a timm model is refused, naming its layer."""
    with pytest.raises(TypeError, match=f"does not support layer {layer}"):
        CERTIFIED_DEFENSES[name](net(arch), eps=0.1, eps_ramp_epochs=1)


@pytest.mark.parametrize("arch", [CONVNET, VIT, CONVNEXT])
def test_evaluation_tiers_pgd_and_autoattack(data, arch):
    """PGD and the reference AutoAttack on 4 digits: every tier runs, worst case <= each attack <= clean."""
    from lit_robust.evaluation.tiers import evaluate_robustness

    model = net(arch).eval()
    x, y = data("PGDAT").splits["test"].tensors
    result = evaluate_robustness(model, (x[:4], y[:4]), eps=0.05, tiers=("pgd", "autoattack"), pgd_steps=3,
                                 progress=False)
    acc = result.accuracy
    assert set(acc) >= {"clean", "pgd", "autoattack", "worst_case"}
    assert 0 <= acc["worst_case"] <= min(acc["pgd"], acc["autoattack"]) <= acc["clean"] <= 1


def test_randomized_smoothing_certifies_a_timm_model():
    from lit_robust.certify import Smooth

    smooth = Smooth(net(VIT).eval(), sigma=0.25, num_classes=10, batch_size=16)
    prediction, radius = smooth.certify(torch.rand(2, 3, 32, 32), n0=4, n=16, alpha=0.1)
    assert prediction.shape == (2,) and ((prediction >= -1) & (prediction < 10)).all()
    assert all(math.isfinite(r) and r >= 0 for r in radius.tolist())


# --- the model itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [CONVNET, VIT, CONVNEXT])
def test_normalisation_inside_equals_timm_on_normalised_input(arch):
    """Logits on [0, 1] images equal the raw timm model's on ``(x - mean) / std`` (its own pretrained_cfg)."""
    model = net(arch).eval()
    raw = model.model
    mean = torch.tensor(raw.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(raw.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw((x - mean) / std), rtol=1e-5, atol=1e-5)
    custom = net(arch, in_chans=1, mean=DIGITS_MEAN, std=DIGITS_STD).eval()
    x1 = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(custom(x1), custom.model((x1 - DIGITS_MEAN[0]) / DIGITS_STD[0]))


def test_mean_std_must_match_the_channels():
    with pytest.raises(ValueError, match="in_chans=1"):
        net(in_chans=1)


def wrapped(model, prefix="module."):
    return {"state_dict": {prefix + k: v for k, v in model.state_dict().items()}, "epoch": 3}


@pytest.mark.parametrize("arch", [CONVNET, VIT])
def test_local_checkpoint_round_trip(tmp_path, arch):
    """A wrapped, DataParallel-prefixed .pth, a .safetensors file, a TimmClassifier's state dict and a defense's
    checkpoint all load to the same logits."""
    source = net(arch).eval()
    torch.save(wrapped(source.model), tmp_path / "w.pth")
    x = torch.rand(3, 3, 32, 32)
    loaded = net(arch, pretrained_path=str(tmp_path / "w.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({k: v.contiguous() for k, v in source.model.state_dict().items()},
                          str(tmp_path / "w.safetensors"))
    again = net(arch, pretrained_path=str(tmp_path / "w.safetensors")).eval()
    torch.save(again.state_dict(), tmp_path / "own.pt")  # a TimmClassifier's own state dict loads too
    own = net(arch, pretrained_path=str(tmp_path / "own.pt")).eval()
    lightning = {"state_dict": {"model." + k: v for k, v in source.state_dict().items()}, "epoch": 1}
    torch.save(lightning, tmp_path / "last.ckpt")  # a defense's checkpoint: the classifier under "model."
    from_ckpt = net(arch, pretrained_path=str(tmp_path / "last.ckpt")).eval()
    with torch.no_grad():
        for model in (again, own, from_ckpt):
            torch.testing.assert_close(model(x), source(x))


def test_other_head_is_reinitialised_with_a_warning(tmp_path):
    source = TimmClassifier(CONVNET, num_classes=7)
    torch.save(source.model.state_dict(), tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="re-initialised"):
        model = net(pretrained_path=str(tmp_path / "w.pth"))
    assert torch.equal(model.model.conv1[0].weight, source.model.conv1[0].weight)
    assert model.model.fc.weight.shape == (10, source.model.fc.in_features)


def test_mismatched_keys_are_listed(tmp_path):
    state = net().model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "bad.pth")
    listed = r"missing keys \['layer1.0.conv1.weight'\], unexpected keys \['extra.weight'\]"
    with pytest.raises(ValueError, match=listed):
        net(pretrained_path=str(tmp_path / "bad.pth"))
    torch.save(net(VIT).model.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="does not fit"):
        net(pretrained_path=str(tmp_path / "vit.pth"))
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        net(pretrained_path=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="checkpoint_key"):
        load_pretrained(net().model, tmp_path / "bad.pth", checkpoint_key="state_dict_ema")


def test_small_input_stems():
    """ResNet: stride-1 stem and no max-pool (32x32 features after the stem); ViT: 4x4 patches, 64 tokens,
    and a 16x16-patch checkpoint resampled into it; ConvNeXt: refused."""
    resnet = net(small_input_stem=True)
    assert resnet.model.conv1[0].stride == (1, 1) and isinstance(resnet.model.maxpool, torch.nn.Identity)
    assert resnet.model.forward_features(torch.rand(1, 3, 32, 32)).shape[-1] == 4  # 32 / 8, not 32 / 32
    vit = net(VIT, small_input_stem=True)
    assert vit.model.patch_embed.proj.stride == (4, 4) and vit.model.patch_embed.num_patches == 64
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="no published 32x32 adaptation"):
        net(CONVNEXT, small_input_stem=True)


def test_vit_checkpoint_is_resampled_to_small_patches(tmp_path):
    big = net(VIT, img_size=64)  # 16x16 patches, a 4x4 grid
    torch.save(big.model.state_dict(), tmp_path / "vit.pth")
    small = net(VIT, small_input_stem=True, pretrained_path=str(tmp_path / "vit.pth"))
    assert torch.equal(small.model.blocks[0].attn.qkv.weight, big.model.blocks[0].attn.qkv.weight)
    assert small.model.pos_embed.shape[1] == 64 + small.model.num_prefix_tokens
    from timm.layers import resample_patch_embed

    resampled = resample_patch_embed(big.model.patch_embed.proj.weight, [4, 4])
    torch.testing.assert_close(small.model.patch_embed.proj.weight, resampled)


def test_import_without_timm_names_the_extra(monkeypatch):
    import builtins

    from lit_robust.models import timm_models

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ImportError, match=r"pip install lit_robust\[timm\]"):
        timm_models.TimmClassifier(CONVNET)


def test_unfused_attention_is_the_same_function():
    fused = net(VIT).eval()
    explicit = net(VIT, fused_attn=False).eval()
    explicit.load_state_dict(fused.state_dict())
    assert not any(getattr(m, "fused_attn", False) for m in explicit.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), fused(x), rtol=1e-5, atol=1e-5)


def test_xcit_small_input_stem_keeps_the_patch_embedding():
    """Debenedetti et al.'s xcit_*_p4_32: the first two stride-2 convolutions of the patch embedding at stride 1,
    the weights kept: 64 tokens from a 32x32 image."""
    kwargs = dict(depth=1, cls_attn_layers=1)
    plain = net("xcit_nano_12_p16_224", **kwargs)
    small = net("xcit_nano_12_p16_224", small_input_stem=True, **kwargs)
    strides = [small.model.patch_embed.proj[i][0].stride for i in (0, 2, 4, 6)]
    assert strides == [(1, 1), (1, 1), (2, 2), (2, 2)] and small.model.patch_embed.patch_size == 4
    small.load_state_dict(plain.state_dict())  # the same parameters
    tokens = small.model.patch_embed(torch.rand(1, 3, 32, 32))[0]
    assert tokens.shape[1] == 64 and small(torch.rand(2, 3, 32, 32)).shape == (2, 10)
