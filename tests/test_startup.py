"""Start-up: --help and argument errors come before any heavy import; optional libraries are imported
only by what needs them; the random-weights warning is said once, by the entry point."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["MyTest_LungInf.py", "MyTrain_LungInf.py", "PseudoGenerator.py", "MyTrain_MulClsLungInf_UNet.py",
           "MyTest_MulClsLungInf_UNet.py", "reproduce.py"]
HEAVY = ("torch", "timm", "segmentation_models_pytorch", "scipy", "nibabel", "pydicom", "cv2")


def _imported_after(code):
    """The HEAVY modules imported by running `code` in a fresh interpreter at the repository root."""
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(filter(None, proc.stdout.strip().split(",")))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_nothing_heavy(script):
    run_help = (f"import runpy, contextlib, io\nsys.argv = [{script!r}, '--help']\n"
                f"try:\n    with contextlib.redirect_stdout(io.StringIO()):\n"
                f"        runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit:\n    pass")
    assert _imported_after(run_help) == set()


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_let_idle_openmp_threads_sleep_unless_told_otherwise(script):
    """OMP_WAIT_POLICY=PASSIVE is set before torch loads libgomp (which reads it then); a user's value is kept."""
    code = (f"import os, runpy, sys\nrunpy.run_path({script!r}, run_name='imported')\n"
            f"print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    for given, want in ((None, "PASSIVE False"), ("ACTIVE", "ACTIVE False")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env.update({"OMP_WAIT_POLICY": given} if given else {})
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert (proc.returncode, proc.stdout.strip()) == (0, want), proc.stderr


# Options a script's --help names that belong to other commands (the examples it gives).
OTHER_COMMANDS = {"--nproc_per_node", "--gt_root", "--pred_root", "--models", "--task", "--stage", "--train_path",
                  "--no"}


@pytest.mark.parametrize("script", SCRIPTS + ["-m EvaluationTool"])
def test_every_option_a_help_names_exists(script):
    """--help names only options the script has (reproduce.py's --amp named an --amp_dtype it lacks)."""
    proc = subprocess.run([sys.executable, *script.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    usage, text = proc.stdout.split("\n\n", 1)[0], proc.stdout
    defined = set(re.findall(r"--[a-z][a-z0-9_]*", usage)) | {"--help"}
    defined |= {"--no-" + option[2:] for option in defined}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", text))
    assert proc.returncode == 0 and named - defined - OTHER_COMMANDS == set(), proc.stdout


def test_package_and_evaluation_tool_import_light():
    assert _imported_after("import Code.model_lung_infection, EvaluationTool, EvaluationTool.report") == set()
    # naming models and encoders does not import their libraries
    names = _imported_after("from Code.model_lung_infection.registry import MODELS, ENCODERS\n"
                            "assert 'unet' in MODELS.names() and 'resnet50' in ENCODERS.names()")
    assert names == set()


def test_optional_libraries_only_for_what_needs_them():
    # Inf-Net needs timm, not segmentation-models-pytorch; a Table II baseline needs that library
    inf_net = _imported_after("from Code.model_lung_infection import create_model\n"
                              "create_model('inf_net', backbone='timm:resnet18')")
    assert "timm" in inf_net and "segmentation_models_pytorch" not in inf_net
    assert not {"scipy", "nibabel", "pydicom"} & inf_net
    unet = _imported_after("from Code.model_lung_infection import create_model\ncreate_model('unet')")
    assert "segmentation_models_pytorch" in unet


def test_random_weights_are_said_once_by_the_training_script(tmp_path, data_root):
    import MyTrain_LungInf
    from Code.model_lung_infection import create_model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constructors are silent
        create_model("inf_net", backbone="timm:resnet18")
    train = data_root / "TrainingSet" / "LungInfection-Train" / "Doctor-label"
    argv = ["--train_path", str(train), "--snapshot_root", str(tmp_path), "--train_save", "w", "--backbone",
            "timm:resnet18", "--epoch", "1", "--batchsize", "2", "--trainsize", "64", "--max_steps", "1",
            "--no-multi_scale", "--progress", "False", "--device", "cpu"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MyTrain_LungInf.main(argv)
    said = [w for w in caught if "RANDOM weights" in str(w.message)]
    assert len(said) == 1 and "--pretrained" in str(said[0].message)
    with warnings.catch_warnings(record=True) as caught:  # fine-tuning starts from trained weights: nothing said
        warnings.simplefilter("always")
        MyTrain_LungInf.main(argv[:5] + ["w2", "--init", str(tmp_path / "save_weights" / "w" / "Inf-Net-1.pth")]
                             + argv[6:])
    assert not [w for w in caught if "RANDOM weights" in str(w.message)]
