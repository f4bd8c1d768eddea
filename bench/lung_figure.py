"""docs/img/lungs_real.png: the lung mask over real slices of ../shared/realct (a normal chest at the hilum and
at the liver dome, TotalSegmentator's abdomen at the lung bases with its colon outlined), for docs/volumes.md.

    python bench/lung_figure.py [--shared ../shared] [--out docs/img/lungs_real.png]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEIGHT = 220
COLOURS = {1: (60, 120, 255), 2: (40, 200, 80)}   # right lung blue, left lung green
DENSE, OUTLINE = (255, 60, 60), (255, 0, 255)


def panel(hu, labels, dense, z, spacing, title, outline=None):
    gray = np.clip((hu[..., z] + 1150.0) / 1400.0 * 255.0, 0, 255)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for side, colour in COLOURS.items():
        m = labels[..., z] == side
        rgb[m] = 0.55 * rgb[m] + 0.45 * np.array(colour)
    rgb[dense[..., z]] = 0.5 * rgb[dense[..., z]] + 0.5 * np.array(DENSE)
    if outline is not None:
        m = outline[..., z]
        rgb[m & ~ndimage.binary_erosion(m)] = OUTLINE
    img = Image.fromarray(rgb.astype(np.uint8))
    width = int(round(HEIGHT * hu.shape[1] * spacing[1] / (hu.shape[0] * spacing[0])))
    img = img.resize((width, HEIGHT), Image.BILINEAR)
    ImageDraw.Draw(img).text((4, 4), title, fill=(255, 255, 0))
    return img


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(ROOT.parent / "shared"))
    p.add_argument("--out", default=str(ROOT / "docs/img/lungs_real.png"))
    a = p.parse_args(argv)
    from Code.model_lung_infection.quantify.lungs import find_lungs
    from Code.model_lung_infection.volume import geometry
    from Code.model_lung_infection.volume.io import read_dicom, read_nifti
    real = Path(a.shared) / "realct"
    panels = []
    volume = read_dicom(real / "chest-normal-dicom")
    orient = geometry.orientation(volume.affine, volume.data.shape)
    hu = orient.display(volume.data)
    lungs = find_lungs(hu, orient.spacing)
    for z, where in ((80, "hilum"), (25, "liver dome")):
        panels.append(panel(hu, lungs.labels, lungs.dense, z, orient.spacing, f"normal chest, {where}"))
    volume = read_nifti(real / "totalseg/example_ct_sm.nii.gz")
    orient = geometry.orientation(volume.affine, volume.data.shape)
    hu = orient.display(volume.data)
    colon = orient.display(read_nifti(real / "totalseg/example_seg.nii.gz").data) == 20
    lungs = find_lungs(hu, orient.spacing)
    panels.append(panel(hu, lungs.labels, lungs.dense, 27, orient.spacing, "abdomen: bases, colon (pink)", colon))
    canvas = Image.new("RGB", (sum(q.width for q in panels), HEIGHT), "black")
    x = 0
    for q in panels:
        canvas.paste(q, (x, 0))
        x += q.width
    canvas.convert("P", palette=Image.ADAPTIVE, colors=96).save(a.out, optimize=True)  # small in git
    print(f"{a.out}: {canvas.size[0]} x {canvas.size[1]}")


if __name__ == "__main__":
    main()
