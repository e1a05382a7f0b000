"""``dino-bridge features``: rows match their image paths, unreadable images are listed, the PCA
picture colours clusters of patch tokens apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dino_bridge import cli
from dino_bridge.eval import eval_transform_for, load_backbone
from dino_bridge.eval.image_features import pooled_features
from dino_bridge.eval.patch_pca import MARGIN, pca_rgb
from dino_bridge.export import write_torch
from dino_bridge.models import build_vit
from dino_bridge.train.checkpoint import MANIFEST, TRAINER_STATE, _write_manifest
from tests.helpers import synthetic_image

SPEC = {
    "arch": "vit_tiny",
    "kwargs": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, n_storage_tokens=1,
                   ffn_layer="swiglu64", layerscale_init=0.5, pos_embed_rope_dtype="fp32"),
    "rgb_mean": [0.5, 0.4, 0.3],
    "rgb_std": [0.2, 0.25, 0.3],
}  # fmt: skip
D = 32


def _backbone_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_vit(SPEC["arch"], **SPEC["kwargs"])
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.state_dict()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run dir whose one checkpoint has a teacher and a (different) student backbone."""
    run = tmp_path_factory.mktemp("run")
    ckpt = run / "ckpt" / "3"
    (ckpt / "dcp").mkdir(parents=True)
    save_file(_backbone_state(0), str(ckpt / "teacher_backbone.safetensors"))
    save_file(_backbone_state(1), str(ckpt / "student_backbone.safetensors"))
    (ckpt / "backbone.json").write_text(json.dumps(SPEC))
    torch.save({}, ckpt / TRAINER_STATE)
    (ckpt / "dcp" / ".metadata").write_bytes(b"")  # the feature command reads the backbone exports only
    _write_manifest(ckpt, 3)
    assert (ckpt / MANIFEST).is_file()
    return run


def _images(root: Path, n: int, broken: tuple[str, ...] = ()) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = root / f"sub{i % 2}" / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic_image(rng, 24 + 4 * i, label=i % 3).save(path)
        paths.append(path)
    for name in broken:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not an image")
    return paths


def _features(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["features", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _alone(model, spec, path: Path, kind: str = "cls") -> np.ndarray:
    """The oracle: one image through the backbone on its own."""
    from dino_bridge.data import load_image

    x = eval_transform_for(spec)(load_image(path))[None]
    with torch.no_grad():
        return pooled_features(model.forward_features(x), kind)[0].numpy()


def test_folder_rows_match_their_paths_and_unreadable_images_are_listed(tmp_path, run_dir, capsys):
    paths = _images(tmp_path / "imgs", 7, broken=("sub0/bad.png",))
    out = tmp_path / "out" / "feats.npy"
    code, stdout, stderr = _features(
        ["--checkpoint", str(run_dir), "--images", str(tmp_path / "imgs"), "--out", str(out),
         "--batch-size", "3"], capsys,
    )  # fmt: skip
    assert code == 0, stderr
    feats = np.load(out)
    assert feats.dtype == np.float32 and feats.shape == (7, D)
    listed = (tmp_path / "out" / "feats.paths.txt").read_text().splitlines()
    assert listed == sorted(str(p) for p in paths)  # the folder's sorted order, the bad file left out
    summary = json.loads((tmp_path / "out" / "feats.json").read_text())
    assert summary["skipped"] == [{"path": str(tmp_path / "imgs/sub0/bad.png"),
                                   "reason": "not a recognised image format"}]  # fmt: skip
    assert summary["which"] == "teacher" and summary["shape"] == [7, D]
    assert "1 unreadable image(s) skipped" in stdout and "bad.png" in stderr
    model, spec = load_backbone(run_dir, "teacher")
    for row, path in zip(feats, listed):  # row i is image i, whatever the batching
        np.testing.assert_allclose(row, _alone(model, spec, Path(path)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_a_txt_list_keeps_its_order_and_student_and_export_load(tmp_path, run_dir, capsys):
    paths = _images(tmp_path / "imgs", 4)
    order = [paths[2], tmp_path / "missing.png", paths[0], paths[3]]
    (tmp_path / "list.txt").write_text("# a comment\n" + "".join(f"{p}\n" for p in order))
    common = ["--images", str(tmp_path / "list.txt"), "--kind", "cls+avgpool"]
    code, _, err = _features(["--checkpoint", str(run_dir), "--which", "student", *common,
                              "--out", str(tmp_path / "s.npy")], capsys)  # fmt: skip
    assert code == 0, err
    readable = [str(p) for i, p in enumerate(order) if i != 1]
    assert (tmp_path / "s.paths.txt").read_text().splitlines() == readable  # the list's order
    skipped = json.loads((tmp_path / "s.json").read_text())["skipped"]
    assert [s["path"] for s in skipped] == [str(tmp_path / "missing.png")]
    student = np.load(tmp_path / "s.npy")
    model, spec = load_backbone(run_dir, "student")
    assert student.shape == (3, 2 * D)
    np.testing.assert_allclose(student[0], _alone(model, spec, paths[2], "cls+avgpool"), atol=1e-5)
    # the teacher exported as a torch backbone dir gives the teacher's features, not the student's
    teacher, spec = load_backbone(run_dir, "teacher")
    write_torch(spec, teacher.state_dict(), tmp_path / "exported")
    code, _, err = _features(["--checkpoint", str(tmp_path / "exported"), *common, "--no-l2",
                              "--out", str(tmp_path / "t.npy")], capsys)  # fmt: skip
    assert code == 0, err
    exported = np.load(tmp_path / "t.npy")
    expected = _alone(teacher, spec, paths[2], "cls+avgpool")
    cls = torch.nn.functional.normalize(torch.from_numpy(exported[:, :D]), dim=1).numpy()
    np.testing.assert_allclose(cls[0], expected[:D] / np.linalg.norm(expected[:D]), atol=1e-5)
    assert not np.allclose(np.linalg.norm(exported, axis=1), 1.0)  # --no-l2: raw rows
    assert not np.allclose(exported[0, :D] / np.linalg.norm(exported[0, :D]), student[0, :D] /
                           np.linalg.norm(student[0, :D]), atol=1e-3)  # fmt: skip
    # an exported dir holds one backbone: --which is refused
    code, _, err = _features(["--checkpoint", str(tmp_path / "exported"), "--which", "student", *common,
                              "--out", str(tmp_path / "u.npy")], capsys)  # fmt: skip
    assert code == 2 and "--which applies to checkpoints" in err


def test_an_hf_directory_uses_its_processor_normalisation(tmp_path, run_dir, capsys):
    from dino_bridge.export import write_hf

    paths = _images(tmp_path / "imgs", 2)
    teacher, spec = load_backbone(run_dir, "teacher")
    write_hf(spec, teacher.state_dict(), tmp_path / "hf")  # rgb_mean/std live in preprocessor_config
    args = ["--checkpoint", str(tmp_path / "hf"), "--images", str(tmp_path / "imgs"), "--out"]
    code, _, err = _features([*args, str(tmp_path / "f.npy")], capsys)
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "f.npy")[0], _alone(teacher, spec, paths[0]), atol=1e-4)
    (tmp_path / "hf" / "preprocessor_config.json").unlink()
    code, _, err = _features([*args, str(tmp_path / "g.npy")], capsys)
    assert code == 2 and "no preprocessor_config.json: the image normalisation" in err


def test_pooled_features_kinds():
    cls, patches = torch.randn(2, 4), torch.randn(2, 6, 4)
    outputs = {"x_norm_clstoken": cls, "x_norm_patchtokens": patches}
    assert torch.equal(pooled_features(outputs, "cls", l2=False), cls)
    assert torch.allclose(pooled_features(outputs, "patch-mean", l2=False), patches.mean(1))
    both = pooled_features(outputs, "cls+avgpool")
    assert torch.allclose(both * torch.cat([cls, patches.mean(1)], 1).norm(dim=1, keepdim=True),
                          torch.cat([cls, patches.mean(1)], 1), atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="unknown feature kind 'max'"):
        pooled_features(outputs, "max")


@pytest.mark.parametrize(
    "images, out, message",
    [
        ("nope", "f.npy", "images 'nope': no such folder or image-list file"),
        ("imgs", "f.txt", "the features file must end in .npy"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, run_dir, capsys, images, out, message):
    _images(tmp_path / "imgs", 1)
    code, _, err = _features(
        ["--checkpoint", str(run_dir), "--images", images if images == "nope" else str(tmp_path / images),
         "--out", str(tmp_path / out)], capsys,
    )  # fmt: skip
    assert code == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_no_readable_image_is_a_clear_error(tmp_path, run_dir, capsys):
    _images(tmp_path / "imgs", 0, broken=("a.png", "b.jpg"))
    code, _, err = _features(["--checkpoint", str(run_dir), "--images", str(tmp_path / "imgs"),
                              "--out", str(tmp_path / "f.npy")], capsys)  # fmt: skip
    assert code == 4 and "error: none of the 2 images could be read (first: " in err
    assert not (tmp_path / "f.npy").exists()


def _two_clusters(seed: int = 0, n: int = 2, grid=(4, 6), d: int = 16):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, d, generator=g) * 3
    labels = torch.randint(0, 2, (n, grid[0] * grid[1]), generator=g)
    return centres[labels] + 0.1 * torch.randn(n, grid[0] * grid[1], d, generator=g), labels


def test_pca_colours_separate_two_clusters_of_patch_tokens():
    tokens, labels = _two_clusters()
    rgb = pca_rgb(tokens, (4, 6))
    assert rgb.shape == (2, 4, 6, 3) and rgb.dtype == np.uint8
    colours, labels = rgb.reshape(-1, 3).astype(float), labels.flatten().numpy()
    means = np.stack([colours[labels == k].mean(0) for k in (0, 1)])
    assert np.abs(means[0] - means[1]).max() > 200  # the first component puts them at either end
    nearest = np.linalg.norm(colours[:, None] - means[None], axis=2).argmin(1)
    assert np.array_equal(nearest, labels)  # every patch has its own cluster's colour
    # the red channel (first component) alone orders the clusters without overlap
    red = colours[:, 0]
    assert red[labels == 0].max() < red[labels == 1].min() or red[labels == 1].max() < red[labels == 0].min()


def test_pca_foreground_threshold_blacks_out_the_border_cluster():
    g = torch.Generator().manual_seed(0)
    h, w, d = 6, 6, 12
    background, fg_a, fg_b = torch.zeros(d), torch.zeros(d), torch.zeros(d)
    background[0], fg_a[1], fg_b[1] = -8.0, 1.5, -1.5
    is_border = torch.zeros(h, w, dtype=torch.bool)
    is_border[0], is_border[-1], is_border[:, 0], is_border[:, -1] = True, True, True, True
    is_border = is_border.flatten()
    is_a = torch.arange(h * w) % 2 == 0
    tokens = torch.where(is_border[:, None], background, torch.where(is_a[:, None], fg_a, fg_b))
    tokens = tokens + 0.05 * torch.randn(h * w, d, generator=g)
    for sign in (1.0, -1.0):  # the sign of the first component must not decide which side is kept
        rgb = pca_rgb(sign * tokens, (h, w), foreground_threshold=0.5)[0].reshape(-1, 3)
        assert (rgb[is_border.numpy()] == 0).all()
        inner = ~is_border.numpy()
        a, b = rgb[inner & is_a.numpy()].astype(float), rgb[inner & ~is_a.numpy()].astype(float)
        assert np.abs(a.mean(0) - b.mean(0)).max() > 200  # refit on the foreground: A and B apart
    with pytest.raises(ValueError, match="do not fill a 5x6 grid"):
        pca_rgb(tokens, (5, 6))


def test_pca_png_shows_the_first_images_at_the_patch_grid(tmp_path, run_dir, capsys):
    _images(tmp_path / "imgs", 3)
    png = tmp_path / "pca.png"
    code, stdout, err = _features(["--checkpoint", str(run_dir), "--images", str(tmp_path / "imgs"),
                                   "--out", str(tmp_path / "f.npy"), "--pca-png", str(png),
                                   "--pca-images", "2"], capsys)  # fmt: skip
    assert code == 0, err
    picture = np.asarray(Image.open(png).convert("RGB"))
    cell = 224  # img_size 16 shown at 14x, a 4x4 patch grid of 56-px blocks
    assert picture.shape == (2 * cell + 3 * MARGIN, 2 * cell + 3 * MARGIN, 3)
    assert "PCA of the patch features of 2 images" in stdout
    left = 2 * MARGIN + cell
    for row in range(2):
        top = MARGIN + row * (cell + MARGIN)
        pca = picture[top : top + cell, left : left + cell].reshape(4, 56, 4, 56, 3)
        assert (pca == pca[:, :1, :, :1]).all()  # nearest upsampling: constant within each patch
        assert len(np.unique(pca[:, 0, :, 0].reshape(-1, 3), axis=0)) > 1  # not one flat colour
    summary = json.loads((tmp_path / "f.json").read_text())
    assert summary["pca_png"]["images"] == (tmp_path / "f.paths.txt").read_text().splitlines()[:2]
