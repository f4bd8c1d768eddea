"""The multi-class pipeline on a few real slices: palette GT reading, training (engine: snapshots,
checkpoint, resume) and the test stage with a prior folder and with priors from an Inf-Net."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import MyTest_MulClsLungInf_UNet as test_cli
import MyTrain_MulClsLungInf_UNet as train_cli
from Code.model_lung_infection.checkpoint import save_release_weights
from Code.model_lung_infection.data import DataError
from Code.model_lung_infection.inf_net import Inf_Net
from Code.model_lung_infection.multiclass import (
    MultiClassConfig,
    MultiClassTrainSet,
    build_model,
    class_maps,
    read_class_indices,
    run_test,
    train,
)

TRAIN_STEMS = ["0", "1", "10", "11"]
TEST_STEMS = ["18", "21"]
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These runs are tiny: one intra-op thread avoids oversubscribing a small, busy CPU
    # (on 2 loaded cores it is several times faster than two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_root(data_root, tmp_path_factory):
    """4 real training slices with their GT and Prior."""
    src = data_root / "TrainingSet" / "MultiClassInfection-Train"
    root = tmp_path_factory.mktemp("mc-train")
    for sub, ext in (("Imgs", ".jpg"), ("GT", ".png"), ("Prior", ".png")):
        (root / sub).mkdir()
        for stem in TRAIN_STEMS:
            shutil.copy(src / sub / f"{stem}{ext}", root / sub / f"{stem}{ext}")
    return root


@pytest.fixture(scope="module")
def test_slices(data_root, tmp_path_factory):
    """2 real test slices, and prior maps for them (their GT-1 | GT-2 union, as 8-bit gray)."""
    src = data_root / "TestingSet" / "MultiClassInfection-Test"
    root = tmp_path_factory.mktemp("mc-test")
    (root / "Imgs").mkdir()
    (root / "Prior").mkdir()
    sizes = {}
    for stem in TEST_STEMS:
        shutil.copy(src / "Imgs" / f"{stem}.jpg", root / "Imgs" / f"{stem}.jpg")
        union = np.array(Image.open(src / "GT-1" / f"{stem}.png")) | np.array(Image.open(src / "GT-2" / f"{stem}.png"))
        Image.fromarray((union > 0).astype(np.uint8) * 200).save(root / "Prior" / f"{stem}.png")
        with Image.open(root / "Imgs" / f"{stem}.jpg") as im:
            sizes[stem] = im.size
    return root, sizes


def small_config(root, run_root, **kw):
    base = dict(train_path=str(root), snapshot_root=str(run_root), trainsize=SIZE, batchsize=2, epoch=1,
                save_every=1, progress=False, device="cpu")
    base.update(kw)
    return MultiClassConfig(**base)


def test_palette_gt_read_as_indices(data_root, tmp_path):
    gt = data_root / "TrainingSet" / "MultiClassInfection-Train" / "GT" / "0.png"
    with Image.open(gt) as im:
        assert im.mode == "P"
        gray = np.array(im.convert("L"))
    idx = read_class_indices(gt)
    assert set(np.unique(idx)) == {0, 1, 2}
    assert set(np.unique(gray)) != {0, 1, 2}  # the gray values are not the classes

    # Another palette with the same indices reads the same.
    with Image.open(gt) as im:
        other = im.copy()
    other.putpalette([0, 0, 0, 10, 200, 30, 250, 250, 250] + [0] * (256 * 3 - 9))
    other.save(tmp_path / "other.png")
    np.testing.assert_array_equal(read_class_indices(tmp_path / "other.png"), idx)


@pytest.mark.parametrize("kind", ["rgb", "gray_values", "index_too_big"])
def test_invalid_gt_names_the_file(data_root, tmp_path, kind):
    gt = data_root / "TrainingSet" / "MultiClassInfection-Train" / "GT" / "0.png"
    with Image.open(gt) as im:
        if kind == "rgb":
            bad = im.convert("RGB")
        elif kind == "gray_values":  # what the release's gray conversion produced
            bad = im.convert("L")
        else:
            a = np.array(im)
            a[0, 0] = 3
            bad = Image.fromarray(a, "P")
            bad.putpalette(im.getpalette())
    path = tmp_path / f"bad_{kind}.png"
    bad.save(path)
    with pytest.raises(DataError, match=f"bad_{kind}.png"):
        read_class_indices(path)


def test_dataset_inputs_and_one_hot_targets(train_root):
    ds = MultiClassTrainSet(train_root, SIZE)
    x, y = ds[0]
    assert x.shape == (6, SIZE, SIZE) and y.shape == (3, SIZE, SIZE)
    assert torch.all(y.sum(0) == 1)
    assert y[1].sum() > 0 and y[2].sum() > 0  # slice 0 has GGO and consolidation
    x3, _ = MultiClassTrainSet(train_root, SIZE, prior=False)[0]
    assert x3.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(x3, x[:3])


def test_invalid_gt_stops_training_set(train_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(train_root, root)
    with Image.open(root / "GT" / "1.png") as im:
        im.convert("L").save(root / "GT" / "1.png")
    with pytest.raises(DataError, match=r"GT[/\\]1\.png"):
        MultiClassTrainSet(root, SIZE)


def batch_loss(model, ds):
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([ds[i][1] for i in range(len(ds))])
    model.train()
    with torch.no_grad():
        return float(torch.nn.functional.binary_cross_entropy_with_logits(model(x), y))


@pytest.fixture(scope="module")
def pair_root(train_root, tmp_path_factory):
    """2 of the training slices: one batch of 2 per epoch."""
    root = tmp_path_factory.mktemp("mc-pair")
    for sub in ("Imgs", "GT", "Prior"):
        (root / sub).mkdir()
        for path in sorted((train_root / sub).iterdir())[:2]:
            shutil.copy(path, root / sub / path.name)
    return root


def test_train_lowers_loss_and_writes_snapshot(pair_root, tmp_path):
    cfg = small_config(pair_root, tmp_path, epoch=2)  # 2 epochs x 1 step
    ds = MultiClassTrainSet(pair_root, SIZE)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    before = batch_loss(model, ds)
    model = train(cfg, model)
    assert batch_loss(model, ds) < before
    run = tmp_path / "save_weights" / "Semi-Inf-Net_UNet"
    assert (run / "Semi-Inf-Net_UNet-1.pth").is_file() and (run / "Semi-Inf-Net_UNet-2.pth").is_file()
    state = torch.load(run / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["trainsize"] == SIZE
    with pytest.raises(FileExistsError):
        train(cfg)


def test_resume_continues_exactly(pair_root, tmp_path):
    # 2 epochs in one go == 1 epoch, then resumed for the 2nd.
    full = train(small_config(pair_root, tmp_path / "a", epoch=2, train_save="run"))
    train(small_config(pair_root, tmp_path / "b", epoch=1, train_save="run"))
    resumed = train(small_config(pair_root, tmp_path / "b", epoch=2, train_save="run", resume=True))
    state = torch.load(tmp_path / "b" / "save_weights" / "run" / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 2
    assert (tmp_path / "b" / "save_weights" / "run" / "Semi-Inf-Net_UNet-2.pth").is_file()
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_fcn8s_image_only_paper_recipe_trains_and_tests(pair_root, test_slices, tmp_path):
    # The "FCNs" baseline: slice only (3 channels), paper recipe (Xavier, SGD 1e-10 ...) at size 64.
    cfg = small_config(pair_root, tmp_path, arch="fcn8s", prior=False, recipe="paper", fc_width=32)
    assert (cfg.init, cfg.lr, cfg.momentum, cfg.weight_decay) == ("xavier", 1e-10, 0.99, 5e-4)
    model = train(cfg)
    assert model.n_channels == 3
    snapshot = tmp_path / "save_weights" / "FCN8s" / "FCN8s-1.pth"
    assert snapshot.is_file()
    root, sizes = test_slices
    # No prior is needed for an image-only model, so the missing prior folder does not matter.
    run_test(snapshot, root, prior_path=tmp_path / "no-such-folder", save_root=tmp_path / "out",
             testsize=SIZE, device="cpu", progress=False)
    check_outputs(tmp_path / "out", "FCN8s", sizes)
    from Code.model_lung_infection.errors import OptionError
    with pytest.raises(OptionError, match=r"--testsize 100: fcn8s needs a multiple of 32 \(e\.g\. 96\)"):
        run_test(snapshot, root, save_root=tmp_path / "out2", testsize=100, device="cpu", progress=False)


def test_recipes_and_cli():
    paper = train_cli.config_from_args(train_cli.parse_args(["--recipe", "paper", "--arch", "fcn8s", "--no-prior"]))
    assert (paper.trainsize, paper.lr, paper.momentum, paper.weight_decay, paper.init) == \
        (512, 1e-10, 0.99, 5e-4, "xavier")
    assert paper.train_save == "FCN8s" and not paper.prior
    release = train_cli.config_from_args(train_cli.parse_args(["--lr", "0.05"]))
    assert (release.trainsize, release.lr, release.momentum, release.weight_decay) == (352, 0.05, 0.7, 0.0)
    assert (release.batchsize, release.epoch, release.save_every) == (16, 200, 10)
    assert release.train_save == "Semi-Inf-Net_UNet"
    a = test_cli.parse_args([])
    assert a.prior_path.replace("\\", "/") == "Results/Lung infection segmentation/Semi-Inf-Net"
    assert a.save_path.replace("\\", "/") == "Results/Multi-class lung infection segmentation"


def test_class_maps_are_disjoint_and_graded():
    rng = np.random.default_rng(0)
    prob = rng.random((3, 20, 30)).astype(np.float32)
    labels, maps = class_maps(prob)
    assert not np.any((maps[1] > 0) & (maps[2] > 0))
    np.testing.assert_array_equal(maps[1] > 0, labels == 1)
    np.testing.assert_array_equal(maps[2] > 0, labels == 2)
    assert len(np.unique(maps[1])) > 10  # graded, not a 0/255 mask


@pytest.fixture(scope="module")
def unet_pth(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mc-weights") / "save_weights" / "MC" / "MC-1.pth"
    save_release_weights(build_model(MultiClassConfig(trainsize=SIZE)), path)
    return path


def check_outputs(save_root, model, sizes):
    for stem, size in sizes.items():
        ggo = Image.open(save_root / "Ground-glass opacities" / model / f"{stem}.png")
        con = Image.open(save_root / "Consolidation" / model / f"{stem}.png")
        ovl = Image.open(save_root / "Overlay" / model / f"{stem}.png")
        assert ggo.size == con.size == ovl.size == size
        assert ggo.mode == con.mode == "L" and ovl.mode == "RGB"
        g, c = np.array(ggo), np.array(con)
        assert not np.any((g > 0) & (c > 0))


def test_test_stage_with_prior_folder(test_slices, unet_pth, tmp_path):
    root, sizes = test_slices
    written = run_test(unet_pth, root, prior_path=root / "Prior", save_root=tmp_path, testsize=SIZE,
                       device="cpu", progress=False)
    assert sorted(p.name for p in written["GGO"]) == sorted(f"{s}.png" for s in TEST_STEMS)
    check_outputs(tmp_path, "MC", sizes)

    # A slice without a prior: an error naming it.
    (root / "Prior" / "21.png").rename(tmp_path / "21.png")
    try:
        with pytest.raises(DataError, match=r"21\.jpg: no infection map"):
            run_test(unet_pth, root, prior_path=root / "Prior", save_root=tmp_path / "x", testsize=SIZE,
                     device="cpu", progress=False)
    finally:
        (tmp_path / "21.png").rename(root / "Prior" / "21.png")


def test_test_stage_with_infnet_priors_on_the_fly(test_slices, unet_pth, tmp_path):
    root, sizes = test_slices
    torch.manual_seed(0)
    infnet = tmp_path / "Inf-Net-random.pth"
    save_release_weights(Inf_Net(), infnet)
    run_test(unet_pth, root / "Imgs", prior_path=tmp_path / "no-such-folder", infnet_pth=infnet,
             save_root=tmp_path / "out", testsize=SIZE, model_name="Semi-Inf-Net_UNet", infnet_testsize=SIZE,
             device="cpu", progress=False)
    check_outputs(tmp_path / "out", "Semi-Inf-Net_UNet", sizes)


class ConstantLogits(torch.nn.Module):
    """A 'network' that labels every pixel `label` (its logit high, the others low)."""

    def __init__(self, label):
        super().__init__()
        self.label = label
        self.w = torch.nn.Parameter(torch.zeros(1))  # iter_batches looks up the device of a parameter

    def forward(self, x):
        logits = torch.full((x.shape[0], 3, *x.shape[2:]), -4.0)
        logits[:, self.label] = 4.0
        return logits + self.w


def test_validator_scores_each_class_of_the_argmax(train_root):
    from Code.model_lung_infection.multiclass.validation import MultiClassValidator
    from Code.model_lung_infection.validation import dice
    samples = MultiClassTrainSet(train_root, SIZE).samples
    validator = MultiClassValidator(samples, SIZE)
    background = validator(ConstantLogits(0), "cpu")  # what a network that learned only frequencies does
    assert background["ggo_dice"] == background["cons_dice"] == background["dice"] == 0
    assert background["ggo_found"] == background["cons_found"] == 0
    ggo = validator(ConstantLogits(1), "cpu")  # GGO everywhere: its Dice is that of the whole slice
    gts = [read_class_indices(gt) for _, _, gt, _ in samples]
    expected = np.mean([dice(np.ones_like(g, bool), g == 1) for g in gts])
    assert ggo["ggo_dice"] == pytest.approx(expected) and 0 < expected < 1
    assert (ggo["ggo_found"], ggo["cons_found"], ggo["cons_dice"]) == (1, 0, 0)
    assert ggo["dice"] == pytest.approx(expected / 2)


def test_val_split_holds_slices_out_and_writes_per_class_scores(train_root, tmp_path, capsys):
    cfg = small_config(train_root, tmp_path, epoch=2, val_split=1, val_every=1)
    train(cfg)
    out = capsys.readouterr().out
    assert "3 samples" in out and "1 held out for validation" in out
    assert cfg.val_stems and cfg.val_stems[0] in TRAIN_STEMS
    run = tmp_path / "save_weights" / "Semi-Inf-Net_UNet"
    header, *rows = (run / "val.csv").read_text().splitlines()
    assert header.split(",") == ["epoch", "minutes", "val_dice", "val_mae", "val_ggo_dice", "val_ggo_found",
                                 "val_cons_dice", "val_cons_found", "train_loss", "lr"]
    assert [r.split(",")[0] for r in rows] == ["1", "2"]
    saved = torch.load(run / "checkpoint.pth", weights_only=True)["config"]
    assert saved["val_stems"] == cfg.val_stems  # a resumed run validates on the same slice


def test_val_split_too_large_is_one_line(train_root, tmp_path, capsys):
    argv = ["--train_path", str(train_root), "--snapshot_root", str(tmp_path), "--trainsize", str(SIZE),
            "--epoch", "1", "--val_split", "4"]
    with pytest.raises(SystemExit) as e:
        train_cli.run_main(train_cli.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --val_split 4: the training set has 4 slices; hold out between 1 and 3"


@pytest.mark.parametrize("name", ["..", "../escaped", "ABSOLUTE", "a/b", ""])
def test_model_name_must_be_one_folder_name(test_slices, unet_pth, tmp_path, capsys, name):
    root, _ = test_slices
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    argv = ["--pth_path", str(unet_pth), "--data_path", str(root), "--prior_path", str(root / "Prior"),
            "--save_path", str(tmp_path / "out"), "--testsize", str(SIZE), "--device", "cpu", "--no-progress",
            "--model_name", name]
    with pytest.raises(SystemExit) as e:
        test_cli.run_main(test_cli.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--model_name" in err
    assert not any((tmp_path / d).exists() for d in ("out", "escaped", "elsewhere"))


def test_prior_of_another_size_is_refused(test_slices, unet_pth, tmp_path):
    """Training refuses a prior whose size differs from its slice's; the test stage does too (it resized it)."""
    root, _ = test_slices
    priors = tmp_path / "Prior"
    shutil.copytree(root / "Prior", priors)
    Image.fromarray(np.zeros((100, 80), np.uint8)).save(priors / "21.png")
    with pytest.raises(DataError, match=r"21\.png is 80x100 but Imgs/21\.jpg"):
        run_test(unet_pth, root, prior_path=priors, save_root=tmp_path / "out", testsize=SIZE, device="cpu",
                 progress=False)
    assert not (tmp_path / "out").exists()


def test_multiclass_folders_hold_one_runs_maps(test_slices, unet_pth, tmp_path):
    from Code.model_lung_infection.errors import OptionError
    root, sizes = test_slices
    kw = dict(prior_path=root / "Prior", save_root=tmp_path, testsize=SIZE, device="cpu", progress=False)
    run_test(unet_pth, root, **kw)
    with pytest.raises(OptionError, match="--overwrite"):
        run_test(unet_pth, root, **kw)
    (tmp_path / "Consolidation" / "MC" / "old.png").write_bytes(b"x")  # no run recorded it: never deleted
    with pytest.raises(OptionError, match="old.png"):
        run_test(unet_pth, root, overwrite=True, **kw)
    (tmp_path / "Consolidation" / "MC" / "old.png").unlink()
    written = run_test(unet_pth, root, overwrite=True, **kw)
    assert sorted(p.name for p in (tmp_path / "Consolidation" / "MC").glob("*.png")) == \
        sorted(p.name for p in written["Consolidation"])
    for folder in ("Ground-glass opacities", "Consolidation", "Overlay"):
        assert (tmp_path / folder / "MC" / "test_run.json").is_file()
    check_outputs(tmp_path, "MC", sizes)


@pytest.mark.parametrize("argv, says", [(["--device", "banana"], "--device banana"),
                                        (["--testsize", "100000"], "--testsize 100000"),
                                        (["--save_path", "FILE"], "is a file")])
def test_bad_test_options_are_one_line(test_slices, unet_pth, tmp_path, capsys, argv, says):
    root, _ = test_slices
    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    base = ["--pth_path", str(unet_pth), "--data_path", str(root), "--prior_path", str(root / "Prior"),
            "--save_path", str(tmp_path / "out"), "--testsize", str(SIZE), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        test_cli.run_main(test_cli.main, base + argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and says in err, err


def test_a_missing_test_folder_names_the_option(unet_pth, tmp_path, capsys):
    argv = ["--pth_path", str(unet_pth), "--data_path", str(tmp_path / "nowhere"), "--save_path", str(tmp_path / "o"),
            "--no-progress"]
    with pytest.raises(SystemExit) as e:
        test_cli.run_main(test_cli.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"error: --data_path: {tmp_path / 'nowhere'}: folder not found; "
                                                f"give the folder holding the slices"), err


def test_test_stage_refuses_masks_given_as_the_slices(test_slices, unet_pth, tmp_path):
    """The multi-class test stage checks its slices as MyTest_LungInf.py does: masks (here the priors at 0.5)
    given as --data_path are one line, before anything is written."""
    root, _ = test_slices
    masks = tmp_path / "masks"
    masks.mkdir()
    for prior in (root / "Prior").iterdir():
        Image.fromarray(np.where(np.array(Image.open(prior).convert("L")) >= 128, 255, 0).astype(np.uint8)).save(
            masks / f"{prior.stem}.png")
    with pytest.raises(DataError, match=rf"{masks}: all \d+ images hold at most two gray levels"):
        run_test(unet_pth, masks, prior_path=root / "Prior", save_root=tmp_path / "out", testsize=SIZE,
                 device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
