"""The paper's training recipe, observed from outside the code that implements it.

Each test runs the real trainer (`train.train`) on a few synthetic slices and watches what happens
through PyTorch's own hooks (optimizer steps, module inputs, parameter gradients), so it checks
what the optimizer and the network actually saw, not how the recipe is written:
- the learning rate steps x0.1 at each decay epoch and does not compound (Sec. IV-A);
- every batch gives three updates, at 0.75, 1 and 1.25 times the training size;
- gradients are clipped by value before the (Adam) update;
- FCN-8s takes fc6/fc7 from torchvision's VGG-16 classifier.
No shared data is needed.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from slices import write_synthetic_slices

import Code.model_lung_infection.train as train_module
from Code.model_lung_infection import Inf_Net
from Code.model_lung_infection.train import TrainConfig, train

SMALL = "timm:resnet18"  # a light encoder with Inf-Net's four taps


def _synthetic_slices(root, n=4, size=96):
    return write_synthetic_slices(root, n, size)


def _cfg(tmp_path, **kw):
    data = tmp_path / "data"
    if not data.exists():
        _synthetic_slices(data)
    base = dict(train_path=[str(data)], snapshot_root=str(tmp_path / "snap"), train_save="run", backbone=SMALL,
                device="cpu", epoch=1, batchsize=2, trainsize=64, save_every=100, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@contextlib.contextmanager
def _on_optimizer_steps(pre=None, post=None):
    """Call pre(optimizer) / post(optimizer) around every optimizer.step() of any optimizer."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    handles = []
    if pre:
        handles.append(register_optimizer_step_pre_hook(lambda opt, args, kwargs: pre(opt)))
    if post:
        handles.append(register_optimizer_step_post_hook(lambda opt, args, kwargs: post(opt)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- learning-rate step

def test_lr_steps_at_the_decay_epoch_without_compounding(tmp_path):
    lr = 1e-3
    lrs = []  # the lr of every update, as the optimizer sees it when it steps
    with _on_optimizer_steps(pre=lambda opt: lrs.append(opt.param_groups[0]["lr"])):
        train(_cfg(tmp_path, epoch=5, lr=lr, decay_epoch=2, decay_rate=0.1, scales=(1.0,), batchsize=1,
                   epoch_samples=1))  # one batch, one update per epoch
    assert lrs == pytest.approx([lr, lr, 0.1 * lr, 0.1 * lr, 0.01 * lr], rel=1e-9)

    # A resumed run continues the same schedule.
    lrs.clear()
    short = dict(lr=lr, decay_epoch=2, decay_rate=0.1, scales=(1.0,), batchsize=1, epoch_samples=1, train_save="b")
    train(_cfg(tmp_path, epoch=3, **short))
    with _on_optimizer_steps(pre=lambda opt: lrs.append(opt.param_groups[0]["lr"])):
        train(_cfg(tmp_path, epoch=5, resume=True, **short))
    assert lrs == pytest.approx([0.1 * lr, 0.01 * lr], rel=1e-9)


# ---------------------------------------------------------------- multi-scale updates

def test_each_batch_gives_three_updates_at_three_scales(tmp_path, monkeypatch):
    events = []
    torch.manual_seed(0)
    model = Inf_Net(backbone=SMALL)
    model.register_forward_pre_hook(lambda mod, args: events.append(("forward", tuple(args[0].shape))))
    real_loss = train_module.segmentation_loss

    def loss(outputs, gt, edge, *args, **kwargs):
        events.append(("targets", tuple(gt.shape), tuple(edge.shape)))
        return real_loss(outputs, gt, edge, *args, **kwargs)

    monkeypatch.setattr(train_module, "segmentation_loss", loss)
    # 128 px: 0.75 / 1 / 1.25 give 96 / 128 / 160, already multiples of 32 (at 352: 256 / 352 / 448).
    with _on_optimizer_steps(post=lambda opt: events.append(("step",))):
        train(_cfg(tmp_path, trainsize=128, batchsize=2, max_steps=1), model=model)
    expected = []
    for side in (96, 128, 160):
        expected += [("forward", (2, 3, side, side)), ("targets", (2, 1, side, side), (2, 1, side, side)), ("step",)]
    assert events == expected


# ---------------------------------------------------------------- gradient clipping

def test_gradients_are_clipped_by_value_before_the_adam_update(tmp_path):
    clip, lr = 0.002, 1e-4
    torch.manual_seed(0)
    model = Inf_Net(backbone=SMALL)
    raw = {}  # each parameter's gradient as backward computed it, before any clipping
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: raw.__setitem__(name, g.detach().clone()))
    params = dict(model.named_parameters())
    seen = {"params": 0, "clipped": 0, "kept": 0, "grad_error": 0.0, "adam_error": 0.0}

    def before_step(opt):  # the gradients Adam is about to use
        for name, g in raw.items():
            p = params[name]
            expected = g.clamp(-clip, clip)
            seen["grad_error"] = max(seen["grad_error"], (p.grad - expected).abs().max().item())
            seen["clipped"] += int((g.abs() > clip).sum())
            seen["kept"] += int(((g.abs() < clip) & (g != 0)).sum())
            seen["params"] += 1

    def after_step(opt):  # Adam's first moments after one step: (1 - beta1) * the clipped gradient
        beta1 = opt.param_groups[0]["betas"][0]
        for name, g in raw.items():
            m = opt.state[params[name]]["exp_avg"]
            seen["adam_error"] = max(seen["adam_error"], (m - (1 - beta1) * g.clamp(-clip, clip)).abs().max().item())

    with _on_optimizer_steps(pre=before_step, post=after_step):
        train(_cfg(tmp_path, clip=clip, lr=lr, scales=(1.0,), max_steps=1), model=model)
    assert seen["params"] > 100  # every trained parameter was checked
    assert seen["clipped"] > 1000 and seen["kept"] > 1000  # the case is real: some clipped, some not
    assert seen["grad_error"] == 0  # |g| > clip -> +-clip exactly; the rest unchanged (by value, not by norm)
    assert seen["adam_error"] <= 1e-12


# ---------------------------------------------------------------- FCN-8s from VGG-16

def test_fcn8s_takes_fc6_fc7_from_torchvision_vgg16_classifier(tmp_path):
    from torchvision.models import vgg16

    from Code.model_lung_infection.multiclass import MultiClassConfig, build_model

    torch.manual_seed(0)
    vgg = vgg16(weights=None).eval()  # random weights stand in for ImageNet's: same keys and shapes
    imagenet = tmp_path / "vgg16-397923af.pth"
    torch.save(vgg.state_dict(), imagenet)
    # Ground truth of the reshape: on a 7x7 pool5 map, fc6 as a conv computes the classifier's Linear.
    pool5 = torch.randn(1, 512, 7, 7)
    with torch.no_grad():
        fc6_linear = F.relu(vgg.classifier[0](pool5.flatten(1)))
        fc7_linear = vgg.classifier[3](fc6_linear)
    reference = {k: v.clone() for k, v in vgg.state_dict().items()}
    del vgg

    # The infection-guided FCN8s of Table III, built as the multi-class trainer builds it.
    cfg = MultiClassConfig(arch="fcn8s", prior=True, pretrained=str(imagenet), snapshot_root=str(tmp_path / "s"))
    model = build_model(cfg)
    sd = model.state_dict()
    assert torch.equal(sd["fc6.weight"], reference["classifier.0.weight"].view(4096, 512, 7, 7))
    assert torch.equal(sd["fc6.bias"], reference["classifier.0.bias"])
    assert torch.equal(sd["fc7.weight"], reference["classifier.3.weight"].view(4096, 4096, 1, 1))
    assert torch.equal(sd["fc7.bias"], reference["classifier.3.bias"])
    for k, v in reference.items():
        if k.startswith("features.") and not k.startswith("features.0."):
            assert torch.equal(sd[k], v), k
    assert sd["features.0.weight"].shape == (64, 6, 3, 3)  # 6 input channels: conv1_1 cannot come from ImageNet
    with torch.no_grad():
        fc6 = F.relu(F.conv2d(pool5, model.fc6.weight, model.fc6.bias))  # no padding: the centre position
        fc7 = F.conv2d(fc6, model.fc7.weight, model.fc7.bias)
    torch.testing.assert_close(fc6.flatten(1), fc6_linear, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fc7.flatten(1), fc7_linear, rtol=1e-4, atol=1e-5)
