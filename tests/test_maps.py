"""The test stage's maps: true probabilities by default, the release's stretch on request, the same
evaluation figures either way, one-line errors of MyTest_LungInf.py, and the multi-class priors
computed on the fly equal to the maps the test script writes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import MyTest_LungInf
from Code.model_lung_infection import Inf_Net, save_release_weights
from Code.model_lung_infection.data import SliceSet
from Code.model_lung_infection.infer import probability_maps
from Code.model_lung_infection.multiclass import infnet_priors
from EvaluationTool import EvaluationError, evaluate_folder, evaluate_pair

ROOT = Path(__file__).resolve().parents[1]
SMALL = "timm:resnet18"
SIZE = 64
SIX = ("meanDic", "meanSen", "meanSpe", "Sm", "meanEm", "MAE")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one thread is faster on a busy CPU


def negative_infnet(backbone=SMALL, seed=0):
    """An Inf-Net whose final logits (S_3) are all about -9 (varying over a slice): no infection.

    In eval mode S_3 = S_g passed down the reverse-attention branches plus each branch's output;
    zeroing the branches' last BatchNorm makes them add nothing, and the decoder's last conv gets a
    bias of -9 (probabilities ~1e-4: 0 in 8 bits)."""
    torch.manual_seed(seed)
    model = Inf_Net(backbone=backbone).eval()
    with torch.no_grad():
        model.ParDec.conv5.weight.mul_(100)
        model.ParDec.conv5.bias.fill_(-9.0)
        for branch in (model.ra4_conv5, model.ra3_conv4, model.ra2_conv4):
            branch.bn.weight.zero_()
            branch.bn.bias.zero_()
    return model


def spread_infnet(backbone=SMALL, seed=0, gain=2000.0):
    """A random Inf-Net whose probability maps cover most of [0, 1] on every test slice (as a trained
    model's do on infected slices): the last branch's output is amplified."""
    torch.manual_seed(seed)
    model = Inf_Net(backbone=backbone).eval()
    with torch.no_grad():
        model.ra2_conv4.bn.weight.mul_(gain)
    return model


def run_script(argv):
    """MyTest_LungInf.main with the small encoder, fp32 and no progress bar."""
    return MyTest_LungInf.main(argv + ["--backbone", SMALL, "--testsize", str(SIZE), "--amp", "False",
                                       "--no-progress", "--device", "cpu"])



def read_maps(folder):
    return {p.stem: np.array(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))}


def test_maps_are_probabilities_unless_minmax_is_asked(test_slices, tmp_path):
    data, names = test_slices(2)
    weights = tmp_path / "negative.pth"
    save_release_weights(negative_infnet(), weights)
    # Library: unstretched by default; all logits about -9 -> probabilities about 1e-4.
    slices = SliceSet(data, SIZE)
    image, _, size = slices[0]
    model = negative_infnet()
    (p,) = probability_maps(model, image[None], [size])
    assert p.dtype == np.float32 and p.shape == tuple(size) and 0 < p.max() < 0.5 / 255
    (s,) = probability_maps(model, image[None], [size], normalize="minmax")
    assert s.min() == 0 and s.max() > 0.99  # the release's stretch
    with pytest.raises(ValueError, match="normalize"):
        probability_maps(model, image[None], [size], normalize="max")

    # Script: a slice without infection gives a dark map by default, a full-range one with --normalize minmax.
    run_script(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(tmp_path / "none")])
    run_script(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(tmp_path / "minmax"),
                 "--normalize", "minmax"])
    dark, stretched = read_maps(tmp_path / "none"), read_maps(tmp_path / "minmax")
    assert sorted(dark) == sorted(stretched) == sorted(os.path.splitext(n)[0] for n in names)
    for stem in dark:
        assert dark[stem].max() == 0, stem
        assert (stretched[stem].min(), stretched[stem].max()) == (0, 255), stem


def _float_results(model, data, gt_dir, normalize):
    """The evaluation tool's curves (mean over the 48 slices, 256 thresholds, 1 first), Sm and MAE on the
    float (not 8-bit) maps of `model`, aggregated as evaluate_folder does."""
    slices = SliceSet(data, SIZE)
    curves, sm, mae = {k: [] for k in ("Dic", "Sen", "Spe", "Em")}, [], []
    for i in range(len(slices)):
        image, stem, size = slices[i]
        (p,) = probability_maps(model, image[None], [size], normalize=normalize)
        r = evaluate_pair(p, np.array(Image.open(gt_dir / f"{stem}.png")))
        for k in curves:
            curves[k].append(r["curves"][k])
        sm.append(r["Sm"])
        mae.append(r["MAE"])
    return {k: np.mean(v, axis=0) for k, v in curves.items()}, float(np.mean(sm)), float(np.mean(mae))


def test_evaluation_figures_do_not_depend_on_the_normalisation(data_root, tmp_path):
    """The toolbox min-max normalises every map, so stretching first cannot change its figures -- up to rounding.

    Exactly equal they are not, for two reasons (both measured on this model):
    - Threshold 1, the first of the 256: the tool (like MATLAB's mapminmax) multiplies by a precomputed
      gain, (max - min) * (1 / (max - min)), which can land one ulp below 1, so the map's brightest pixels
      may miss threshold 1 in one mode and pass it in the other. That moves the curves at t = 1 only (here
      Spe by 0.04 there, so meanSpe by 0.04 / 256); every other threshold agrees to ~3e-6 (float32 ties).
    - 8 bits: a file rounds p*255 in one mode and the stretched map*255 in the other; the tool's min-max
      cannot undo that rounding. Where maps span the gray range (as a trained model's do on infected
      slices) the files differ by a gray level here and there and the figures by < 1e-3. A flat untrained
      model (probabilities all within 0.49-0.50) gets only 2-3 gray levels unstretched, and its figures
      then differ by up to 0.2: the map's resolution, not the toolbox (not asserted: not a property we want).
    """
    data = data_root / "TestingSet/LungInfection-Test"
    gt_dir = data / "GT"
    model = spread_infnet()
    # (1) the toolbox's invariance, on float maps: S-alpha and MAE, and each curve below threshold 1
    (ca, sma, maea), (cb, smb, maeb) = (_float_results(model, data, gt_dir, n) for n in ("none", "minmax"))
    assert sma == pytest.approx(smb, abs=1e-6) and maea == pytest.approx(maeb, abs=1e-6)
    for k in ca:
        np.testing.assert_allclose(ca[k][1:], cb[k][1:], rtol=0, atol=1e-5, err_msg=k)

    # (2) the six figures of the 8-bit files MyTest_LungInf.py writes
    weights = tmp_path / "spread.pth"
    save_release_weights(model, weights)
    for mode in ("none", "minmax"):
        run_script(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(tmp_path / mode),
                    "--normalize", mode])
    none, minmax = read_maps(tmp_path / "none"), read_maps(tmp_path / "minmax")
    assert len(none) == 48
    diff = max(int(np.abs(none[s].astype(int) - minmax[s].astype(int)).max()) for s in none)
    assert diff >= 1  # the two modes really write different files
    fa, fb = evaluate_folder(gt_dir, tmp_path / "none"), evaluate_folder(gt_dir, tmp_path / "minmax")
    for k in SIX:
        assert fa[k] == pytest.approx(fb[k], abs=1e-3), k


def test_missing_checkpoint_is_one_line(tmp_path):
    # Run where no Snapshots/ exists, so the default --pth_path is missing.
    r = subprocess.run([sys.executable, str(ROOT / "MyTest_LungInf.py")], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "INFNET_DEBUG": ""})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and MyTest_LungInf.DEFAULT_PTH in lines[0]
    assert "--pth_path" in lines[0] and "MyTrain_LungInf.py" in lines[0] and "Inf-Net-100.pth" in lines[0]


@pytest.mark.parametrize("argv", [["--testsize", "0"], ["--batchsize", "0"], ["--batchsize", "-2"],
                                  ["--normalize", "max"]])
def test_test_script_rejects_invalid_options(argv, capsys):
    with pytest.raises(SystemExit) as e:
        MyTest_LungInf.parse_args(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_test_script_defaults():
    a = MyTest_LungInf.parse_args([])
    assert (a.normalize, a.channels_last, a.amp, a.testsize, a.batchsize) == ("none", True, None, 352, 8)
    assert a.pth_path == MyTest_LungInf.DEFAULT_PTH


@pytest.mark.parametrize("normalize", ["none", "minmax"])
def test_infnet_priors_equal_the_test_script_maps(test_slices, tmp_path, normalize):
    """The multi-class priors computed on the fly are, pixel for pixel, the maps MyTest_LungInf.py writes."""
    data, _ = test_slices(3)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    run_script(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(tmp_path / "maps"),
                 "--normalize", normalize])
    written = read_maps(tmp_path / "maps")
    priors = infnet_priors(weights, data, SIZE, SMALL, "cpu", amp=False, normalize=normalize)
    assert sorted(priors) == sorted(written) and len(written) == 3
    for stem, prior in priors.items():
        assert prior.dtype == np.uint8
        np.testing.assert_array_equal(prior, written[stem], err_msg=stem)
        assert len(np.unique(prior)) > 16  # real maps, not a constant that anything would match


# ---------------------------------------------------------------- one run per output folder

def _one_line_error(argv, capsys):
    """Run MyTest_LungInf.py's main as the script does; returns its one stderr line (exit status 2)."""
    from Code.model_lung_infection.cli import run_main
    with pytest.raises(SystemExit) as e:
        run_main(MyTest_LungInf.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_a_test_folder_holds_one_runs_maps(test_slices, tmp_path, capsys):
    data, names = test_slices(2)
    a, b, out = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "out"
    save_release_weights(spread_infnet(seed=0), a)
    save_release_weights(spread_infnet(seed=1), b)
    run_script(["--pth_path", str(a), "--data_path", str(data), "--save_path", str(out)])
    gt = tmp_path / "GT"
    gt.mkdir()
    for stem, m in read_maps(out).items():
        Image.fromarray((m > 128).astype(np.uint8) * 255).save(gt / f"{stem}.png")
    first = read_maps(out)
    record = json.loads((out / "test_run.json").read_text())
    assert record["complete"] and sorted(record["maps"]) == sorted(f"{s}.png" for s in first)
    assert record["weights"]["path"] == str(a.resolve()) and record["data_path"] == str(data.resolve())

    # A second model into the same folder: refused in one line, nothing written.
    err = _one_line_error(["--pth_path", str(b), "--data_path", str(data), "--save_path", str(out), "--backbone",
                           SMALL, "--testsize", str(SIZE), "--amp", "False", "--no-progress"], capsys)
    assert "--save_path" in err and "--overwrite" in err and str(a) in err
    assert read_maps(out).keys() == first.keys()
    assert all(np.array_equal(read_maps(out)[s], m) for s, m in first.items())

    # --overwrite never deletes a PNG no test run recorded (a GT folder given by mistake): refused, naming it.
    shutil.copy(out / f"{next(iter(first))}.png", out / "foreign.png")
    err = _one_line_error(["--pth_path", str(b), "--data_path", str(data), "--save_path", str(out), "--overwrite",
                           "--backbone", SMALL, "--testsize", str(SIZE), "--no-progress"], capsys)
    assert "foreign.png" in err and (out / "foreign.png").is_file()
    (out / "foreign.png").unlink()
    # --overwrite deletes the recorded maps first: A's map of a slice B does not test is gone too.
    one = tmp_path / "one"
    (one / "Imgs").mkdir(parents=True)
    shutil.copy(data / "Imgs" / names[0], one / "Imgs" / names[0])
    run_script(["--pth_path", str(b), "--data_path", str(one), "--save_path", str(out), "--overwrite"])
    assert sorted(read_maps(out)) == [os.path.splitext(names[0])[0]]
    assert json.loads((out / "test_run.json").read_text())["weights"]["path"] == str(b.resolve())
    run_script(["--pth_path", str(b), "--data_path", str(data), "--save_path", str(out), "--overwrite"])
    assert sorted(read_maps(out)) == sorted(first)
    evaluate_folder(gt, out)  # exactly the recorded maps: evaluated

    # A map of another run put into the folder later: the evaluation refuses the mix.
    stem = next(iter(first))
    Image.fromarray(first[stem]).save(out / f"{stem}.png")
    with pytest.raises(EvaluationError, match=f"changed since.*{stem}.png"):
        evaluate_folder(gt, out)


def test_stale_temporaries_are_removed_and_never_counted(test_slices, tmp_path):
    data, _ = test_slices(2)
    weights, out = tmp_path / "w.pth", tmp_path / "out"
    save_release_weights(spread_infnet(), weights)
    out.mkdir()
    stale = out / ".tmp-0123456789abcdef.png"  # what a run killed during atomic_write leaves
    stale.write_bytes(b"half a png")
    run_script(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(out)])  # not "holds files"
    assert not stale.exists() and len(read_maps(out)) == 2


def test_output_folder_guards(test_slices, tmp_path, capsys):
    data, _ = test_slices(1)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    common = ["--pth_path", str(weights), "--data_path", str(data), "--backbone", SMALL, "--testsize", str(SIZE),
              "--no-progress"]
    (tmp_path / "file").write_text("x")
    assert "is a file" in _one_line_error(common + ["--save_path", str(tmp_path / "file")], capsys)
    assert "input slices" in _one_line_error(common + ["--save_path", str(data / "Imgs"), "--overwrite"], capsys)


def test_a_gt_folder_given_as_the_slices_is_refused(data_root, test_slices, tmp_path, capsys):
    """--data_path pointing at GT/: the masks would be segmented like CT without complaint; refused in one line
    before anything is written. A folder where any image is CT is segmented (masks_as_slices looks at all)."""
    data, names = test_slices(2)
    gt = tmp_path / "GT"
    gt.mkdir()
    stems = [os.path.splitext(n)[0] for n in names]
    for stem in stems:
        shutil.copy(data_root / "TestingSet/LungInfection-Test/GT" / f"{stem}.png", gt / f"{stem}.png")
    weights, out = tmp_path / "w.pth", tmp_path / "out"
    save_release_weights(spread_infnet(), weights)
    common = ["--pth_path", str(weights), "--backbone", SMALL, "--testsize", str(SIZE), "--no-progress",
              "--save_path", str(out)]
    err = _one_line_error(common + ["--data_path", str(gt)], capsys)
    assert err.startswith(f"error: {gt}: all 2 images hold at most two gray levels") and "Imgs/" in err, err
    assert not out.exists()
    shutil.copy(data / "Imgs" / names[0], gt / f"ct-{names[0]}")  # one real slice among the masks
    run_script(["--pth_path", str(weights), "--data_path", str(gt), "--save_path", str(out)])
    assert len(read_maps(out)) == 3


@pytest.mark.parametrize("argv, says", [(["--device", "banana"], "--device banana"),
                                        (["--testsize", "100000"], "--testsize 100000"),
                                        (["--testsize", "8"], "--testsize 8"),
                                        (["--backbone", "nope"], "--backbone 'nope': choose one of")])
def test_bad_test_options_are_one_line(test_slices, tmp_path, capsys, argv, says):
    data, _ = test_slices(1)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    err = _one_line_error(["--pth_path", str(weights), "--data_path", str(data), "--save_path",
                           str(tmp_path / "out"), "--no-progress", *argv], capsys)
    assert err.startswith("error: ") and says in err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_one_line(test_slices, tmp_path, capsys, monkeypatch):
    """A read-only file system (EROFS; root ignores chmod, so it is simulated where the rename happens)."""
    import errno

    import Code.model_lung_infection.atomic as atomic
    data, _ = test_slices(1)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))
    monkeypatch.setattr(atomic.os, "replace", read_only)
    err = _one_line_error(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(tmp_path / "out"),
                           "--backbone", SMALL, "--testsize", str(SIZE), "--no-progress"], capsys)
    assert "cannot write" in err and "Read-only file system" in err and "--save_path" in err


def test_num_workers_and_pin_memory_reach_the_loader(test_slices, tmp_path, monkeypatch):
    import Code.model_lung_infection.infer as infer
    data, _ = test_slices(3)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    seen = []
    real = infer.DataLoader

    def spy(*args, **kwargs):
        seen.append((kwargs["num_workers"], kwargs["pin_memory"], kwargs["batch_size"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(infer, "DataLoader", spy)
    run_script(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(tmp_path / "a"),
                "--num_workers", "1", "--batchsize", "2"])
    run_script(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(tmp_path / "b"),
                "--num_workers", "100000"])
    assert seen == [(1, False, 2), (os.cpu_count(), False, 8)]  # bounded by the CPU count; pinned on CUDA only
    assert len(read_maps(tmp_path / "a")) == len(read_maps(tmp_path / "b")) == 3


def test_batches_side_by_side_give_the_same_maps(test_slices, tmp_path, monkeypatch):
    """On a CPU with two or more threads the test stage computes two batches at once, each on half the threads
    (infer.default_streams): the maps are those of one batch at a time (to one gray level in bf16), and the thread
    count is restored."""
    import Code.model_lung_infection.infer as infer
    data, _ = test_slices(3)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    used, real = [], infer.side_by_side

    def spy(fn, items, streams=1):
        used.append(streams)
        yield from real(fn, items, streams)
    monkeypatch.setattr(infer, "side_by_side", spy)
    torch.set_num_threads(2)  # (the one_thread fixture restores its count after the test)
    argv = ["--pth_path", str(weights), "--data_path", str(data), "--batchsize", "1"]
    run_script(argv + ["--save_path", str(tmp_path / "two")])
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(infer, "default_streams", lambda device, batches: 1)
    run_script(argv + ["--save_path", str(tmp_path / "one")])
    assert used == [2, 1]
    two, one = read_maps(tmp_path / "two"), read_maps(tmp_path / "one")
    assert len(two) == 3 and two.keys() == one.keys()
    for k in one:
        # Identical in fp32. In bf16 (the default on CPUs with native bf16) oneDNN's kernels depend on the thread
        # count: a few pixels in 10^5 differ by one gray level.
        apart = np.abs(two[k].astype(int) - one[k])
        assert apart.max() <= 1 and (apart > 0).mean() < 1e-3, k


def test_slices_are_decoded_while_the_model_loads(test_slices, tmp_path, monkeypatch):
    """The test stage forks its decoding worker before it loads the weights (the load runs mostly on one core,
    the worker decodes on the other); the batches of a started `Batches` are those of one started later."""
    import Code.model_lung_infection.infer as infer
    data, _ = test_slices(3)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    started, events = [], []
    real_start, real_load = infer.Batches.start, infer.load_for_test

    def start(self):
        started.append(self)
        return real_start(self)

    def load(*args, **kwargs):  # how many decoding processes are alive when the load begins
        events.append(("load", sum(w.is_alive() for b in started for w in b._started._workers)))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(infer.Batches, "start", start)
    monkeypatch.setattr(infer, "load_for_test", load)
    run_script(["--pth_path", str(weights), "--data_path", str(data), "--batchsize", "1", "--num_workers", "1",
                "--save_path", str(tmp_path / "out")])
    assert events == [("load", 1)]  # the worker was already running when the load began
    assert len(read_maps(tmp_path / "out")) == 3

    slices = SliceSet(data, 64)
    started = list(infer.Batches(slices, 2, num_workers=1).start())
    later = list(infer.Batches(slices, 2))
    assert [keys for _, keys, _ in started] == [keys for _, keys, _ in later] == [[s for s, _ in slices.items[:2]],
                                                                                  [slices.items[2][0]]]
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(started, later))


def test_side_by_side_keeps_the_order_and_reads_few_items_ahead():
    import time

    from Code.model_lung_infection.infer import side_by_side
    pulled = []

    def items():
        for i in range(10):
            pulled.append(i)
            yield i

    def slow_first(i):
        time.sleep(0.05 if i == 0 else 0)
        return i * i

    threads = torch.get_num_threads()
    out = side_by_side(slow_first, items(), streams=2)
    assert next(out) == 0 and len(pulled) <= 4  # at most 2 * streams items in flight
    assert list(out) == [i * i for i in range(1, 10)]
    assert torch.get_num_threads() == threads
    started = []

    def fails_at_3(i):
        started.append(i)
        if i == 3:
            raise ValueError("slice 3")
        return i
    with pytest.raises(ValueError, match="slice 3"):
        list(side_by_side(fails_at_3, range(100), streams=2))
    assert torch.get_num_threads() == threads
    assert len(started) <= 8  # the error stops the run: nothing queued behind it is started


def test_the_script_ends_with_its_output_complete(test_slices, tmp_path):
    """MyTest_LungInf.py leaves without Python's teardown (cli.exit_now): its stdout, even through a pipe,
    and every file it wrote are complete."""
    data, _ = test_slices(2)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    r = subprocess.run([sys.executable, str(ROOT / "MyTest_LungInf.py"), "--pth_path", str(weights), "--data_path",
                        str(data), "--save_path", str(tmp_path / "out"), "--backbone", SMALL, "--testsize",
                        str(SIZE), "--no-progress"], capture_output=True, text=True,
                       env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # block-buffered
                            "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(f"wrote 2 maps to {tmp_path / 'out'}")
    record = json.loads((tmp_path / "out" / "test_run.json").read_text())
    assert record["complete"] and record["count"] == 2 and len(read_maps(tmp_path / "out")) == 2


def test_run_test_takes_a_test_config(test_slices, tmp_path):
    """The options are declared once (configs.TestConfig): the script builds one from its arguments."""
    from Code.model_lung_infection.cli import config_from_args
    from Code.model_lung_infection.configs import TestConfig
    from Code.model_lung_infection.infer import run_test
    data, _ = test_slices(2)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    a = MyTest_LungInf.parse_args(["--pth_path", str(weights), "--data_path", str(data), "--save_path",
                                   str(tmp_path / "cfg"), "--backbone", SMALL, "--testsize", str(SIZE), "--amp",
                                   "False", "--no-progress", "--batchsize", "2"])
    cfg = config_from_args(TestConfig, a)
    assert (cfg.testsize, cfg.batchsize, cfg.backbone, cfg.amp) == (SIZE, 2, SMALL, False)
    written = run_test(cfg)
    again = run_test(str(weights), data, tmp_path / "kw", testsize=SIZE, backbone=SMALL, amp=False, batchsize=2,
                     progress=False)  # the keyword form callers use
    assert [p.name for p in written] == [p.name for p in again]
    for p, q in zip(written, again):
        assert np.array_equal(np.array(Image.open(p)), np.array(Image.open(q)))


def test_tta_averages_the_logits_of_the_views_of_each_slice(data_root):
    """--tta: each output map of the wrapped model is the mean of the model's maps of the slice and of its views
    (flips, rescaled copies), each mapped back onto the slice's map (a forgotten flip back, or a mean of the
    wrong copies, fails here)."""
    import torch.nn.functional as F

    from Code.model_lung_infection.errors import OptionError
    from Code.model_lung_infection.tta import with_tta
    model = spread_infnet()
    slices = SliceSet(data_root / "TestingSet/LungInfection-Test/Imgs", 128)
    x = torch.stack([slices[i][0] for i in range(3)])
    assert with_tta(model, "none") is model

    def flipped(d):
        return lambda out: [o.flip(d) for o in model(x.flip(d))]

    def scaled(side):
        x_s = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=side < 128)
        return lambda out: [F.interpolate(o, size=p.shape[-2:], mode="bilinear", align_corners=False)
                            for o, p in zip(model(x_s), out)]

    with torch.inference_mode():
        plain = model(x)
        for name, views in (("hflip", [flipped((3,))]), ("flips", [flipped((3,)), flipped((2,)), flipped((2, 3))]),
                            ("scales", [scaled(96), scaled(160)])):  # 0.82 and 1.18 of 128, in multiples of 32
            averaged = with_tta(model, name)(x)
            others = [view(plain) for view in views]
            assert len(averaged) == len(plain) == 5
            for i, out in enumerate(averaged):
                expected = torch.stack([plain[i]] + [o[i] for o in others]).mean(0)
                assert out.shape == plain[i].shape and torch.allclose(out, expected, atol=1e-5), name
            assert (averaged[3] - plain[3]).abs().max() > 0.1  # the views do change this model's maps
    with pytest.raises(OptionError, match="--tta rot90: choose one of none, hflip, flips, scales"):
        with_tta(model, "rot90")


def test_the_test_script_applies_tta_and_records_it(test_slices, tmp_path):
    """MyTest_LungInf.py --tta hflip writes the maps of the flip-averaged model (within a gray level: the script
    fuses BN) and says so in test_run.json."""
    from Code.model_lung_infection.tta import with_tta
    data, _ = test_slices(2)
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    for tta in ("none", "hflip"):
        run_script(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(tmp_path / tta),
                    "--tta", tta])
        assert json.loads((tmp_path / tta / "test_run.json").read_text())["options"]["tta"] == tta
    written, plain = read_maps(tmp_path / "hflip"), read_maps(tmp_path / "none")
    dataset = SliceSet(data, SIZE)
    model = with_tta(spread_infnet(), "hflip")
    for image, stem, size in (dataset[i] for i in range(len(dataset))):
        expected = np.round(probability_maps(model, image[None], [size])[0] * 255)
        assert np.abs(written[stem].astype(float) - expected).max() <= 1
        assert np.abs(written[stem].astype(float) - plain[stem]).max() > 20


def test_a_truncated_slice_stops_the_test_before_anything_is_written(test_slices, tmp_path, capsys):
    """Every slice decodes before the run starts: a cut-short JPEG met mid-run left an unfinished folder that the
    rerun then refused without --overwrite."""
    data, names = test_slices(2)
    cut = data / "Imgs" / names[1]
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])
    weights, out = tmp_path / "w.pth", tmp_path / "out"
    save_release_weights(spread_infnet(), weights)
    err = _one_line_error(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(out),
                           "--backbone", SMALL, "--testsize", str(SIZE), "--no-progress"], capsys)
    assert "test slices" in err and str(cut) in err and "truncated" in err
    assert not out.exists()


def test_a_data_path_that_is_neither_slices_nor_a_volume_is_one_line(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    save_release_weights(spread_infnet(), weights)
    (tmp_path / "notes.txt").write_text("x")
    err = _one_line_error(["--pth_path", str(weights), "--data_path", str(tmp_path / "notes.txt"), "--save_path",
                           str(tmp_path / "out"), "--backbone", SMALL, "--no-progress"], capsys)
    assert err.startswith(f"error: --data_path: {tmp_path / 'notes.txt'}: folder not found; give the folder holding")


def test_a_weights_folder_as_pth_path_lists_the_files_in_it(tmp_path, capsys):
    run = tmp_path / "Inf-Net"
    run.mkdir()
    for name in ("checkpoint.pth", "Inf-Net-10.pth"):
        (run / name).write_bytes(b"x")
    err = _one_line_error(["--pth_path", str(run), "--data_path", str(tmp_path), "--no-progress"], capsys)
    assert err == f"error: --pth_path {run} is a folder: give a weights file in it (Inf-Net-10.pth, checkpoint.pth)"


def test_a_folder_of_an_unfinished_run_is_said_to_be_one(test_slices, tmp_path, capsys, monkeypatch):
    """A run stopped mid-way (Ctrl-C, a full disk) leaves a record marked incomplete: the rerun's refusal says so."""
    import Code.model_lung_infection.infer as infer
    data, _ = test_slices(2)
    weights, out = tmp_path / "w.pth", tmp_path / "out"
    save_release_weights(spread_infnet(), weights)
    real = infer.iter_maps

    def stop_after_one(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise KeyboardInterrupt
    monkeypatch.setattr(infer, "iter_maps", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_script(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(out)])
    monkeypatch.undo()
    err = _one_line_error(["--pth_path", str(weights), "--data_path", str(data), "--save_path", str(out),
                           "--backbone", SMALL, "--testsize", str(SIZE), "--no-progress"], capsys)
    assert f"(an unfinished run of {weights.resolve()}: 1 of 2 maps)" in err and "--overwrite" in err, err
